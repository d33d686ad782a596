"""Figures: training curves (loss.png, grad_norm.png), task loss against forgetting (forgetting.png) and the
effective rank before and after fine-tuning (effective_rank.png).

matplotlib is imported inside the plotting functions, with the Agg backend, so nothing else pays for it. The study's
figures (study/make_results.py) are these functions too.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .._io import atomic_path
from .summaries import final_metric, mean_std, ordered


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points (odd; fewer at the ends): no lag, so a smoothed curve crosses
    another where the trend does, not a few steps later as an exponential average would."""
    half = max(window, 1) // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def _same(values: Sequence) -> bool:
    return len(set(values)) == 1


def curve_title(runs: list[dict]) -> str:
    """"smollm2-135m · rank 8 · lr 0.0005": what the curves share. A rank or rate that differs between methods is
    given per method in the legend instead (see `_curve_label`)."""
    parts = []
    models = sorted({Path(str(r["model"])).name or str(r["model"]) for r in runs if r.get("model")})
    if models:
        parts.append(", ".join(models))
    for key in ("rank", "lr"):
        values = [r.get(key) for r in runs if r.get(key) is not None]
        if values and _same(values):
            parts.append(f"{key} {values[0]:g}")
    return " · ".join(parts)


def _curve_label(method: str, runs: list[dict]) -> str:
    extra = []
    for key in ("rank", "lr"):
        if f"{key}=" in method:  # a spec that names it already ("lora:lr=2e-3")
            continue
        if not _same([r.get(key) for r in runs]):
            mine = sorted({r.get(key) for r in runs if r["method"] == method and r.get(key) is not None})
            extra += [f"{key} {v:g}" for v in mine]
    return f"{method} ({', '.join(extra)})" if extra else method


def plot_curves(runs: list[dict], key: str, path, *, methods=None, tasks=None, max_step: Optional[int] = None):
    """One panel per task; per method the mean over seeds at each step, shaded between min and max (the paper's
    Figures 1 and 5). Per-step values are noisy and cross constantly, so from 20 steps on each is drawn faint
    with a centred moving average over about a tenth of the steps on top. The title names model, rank and rate."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    tasks = ordered([r["task"] for r in runs], tasks)
    methods = ordered([r["method"] for r in runs], methods)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    smoothed = False
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(methods):
            curves = defaultdict(list)
            for run in runs:
                if run["task"] == task and run["method"] == method:
                    for rec in run["history"]:
                        if key in rec and (max_step is None or rec["step"] <= max_step):
                            curves[rec["step"]].append(rec[key])
            if not curves:
                continue
            steps = sorted(curves)
            mean = [statistics.fmean(curves[s]) for s in steps]
            color = colors[i % len(colors)]
            window = (len(steps) // 10) | 1  # odd, about a tenth of the run; 1 (no smoothing) below 20 steps
            label = _curve_label(method, runs)
            if window > 1:
                smoothed = True
                ax.plot(steps, mean, color=color, linewidth=0.8, alpha=0.3)
                ax.plot(steps, smooth(mean, window), label=label, color=color, linewidth=1.6)
            else:
                ax.plot(steps, mean, label=label, color=color, linewidth=1.4)
            if any(len(curves[s]) > 1 for s in steps):
                ax.fill_between(steps, [min(curves[s]) for s in steps], [max(curves[s]) for s in steps],
                                color=color, alpha=0.12, linewidth=0)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel({"loss": "training loss", "grad_norm": "gradient norm"}.get(key, key))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = curve_title(runs)
    if smoothed:
        title += ("  " if title else "") + "(faint: per step; solid: moving average)"
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """The keys no other key beats on both counts: (task loss, forgetting), lower is better on each; a point another
    one equals on one count and beats on the other is dominated."""
    front = set()
    for m, (x, y) in points.items():
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for o, (x2, y2) in points.items() if o != m):
            front.add(m)
    return front


def plot_forgetting(runs: list[dict], split: str, path, *, methods=None, tasks=None, title: Optional[str] = None):
    """One panel per task: per method its mean held-out task loss on `split` (x) against its mean forgetting (y),
    error bars the seeds' standard deviation both ways (none with one seed), n = seeds beside each point, and the
    Pareto front of the means as a dashed staircase with its points ringed. Lower left is better on both counts.
    Runs without a forgetting measure or a `split` loss are left out."""
    plt = _pyplot()
    runs = [r for r in runs if r.get("forgetting") is not None and final_metric(r, split, "loss") is not None]
    tasks = ordered([r["task"] for r in runs], tasks)
    methods = ordered([r["method"] for r in runs], methods)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(6 * max(len(tasks), 1), 5), squeeze=False)
    handles = {}
    for ax, task in zip(axes[0], tasks):
        means = {}
        for i, method in enumerate(methods):
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            (x, dx) = mean_std([final_metric(r, split, "loss") for r in mine])
            (y, dy) = mean_std([r["forgetting"] for r in mine])
            means[method] = (x, y)
            handles[method] = ax.errorbar([x], [y], xerr=[dx], yerr=[dy], fmt=markers[i % len(markers)], capsize=3,
                                          color=colors[i % len(colors)], label=_curve_label(method, runs))
            ax.annotate(f"n={len(mine)}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = sorted(means[m] for m in pareto_front(means))
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", linestyle="--", color="black", linewidth=1, label="_front")
            ax.scatter(xs, ys, s=180, facecolors="none", edgecolors="black", linewidths=1, zorder=3)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{task} (dashed, ringed: Pareto front of the means)", fontsize=9)
        ax.set_xlabel(f"{split} loss on the task (lower is better)")
        ax.set_ylabel("forgetting: Δ held-out text loss (lower is better)")
        ax.grid(alpha=0.3)
    shown = [m for m in methods if m in handles]
    fig.legend([handles[m] for m in shown], [_curve_label(m, runs) for m in shown], loc="lower center", ncol=3,
               fontsize=8, frameon=False)
    title = curve_title(runs) if title is None else title
    fig.suptitle(" · ".join(p for p in (title, "mean ± sd over seeds") if p), fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (max(len(shown) - 1, 0) // 3), 1, 1))
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def plot_effective_rank(rows: list[dict], path, title: str = "Effective rank"):
    """A grouped bar chart of each layer type's effective rank before and after fine-tuning (the paper's Figure 3),
    from `report.effective_rank_table`'s rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["before"] for r in rows], width=0.4, label="before fine-tuning")
    ax.bar([x + 0.2 for x in xs], [r["after"] for r in rows], width=0.4, label="after fine-tuning")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["layer_type"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("effective rank")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
