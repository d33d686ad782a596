"""Tables: summary.md / summary.csv (with the figures of plots.py beside them), and the effective-rank report."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .._io import atomic_path, write_text_atomic
from .summaries import final_metric, mean_std, ordered


def collect_runs(root) -> list[dict]:
    """Every finished run under `root`: its summary, plus its step-by-step history as `history`."""
    from .rundir import RunDir  # the run folder's file names and formats live there

    runs = []
    for summary_path in sorted(Path(root).rglob(RunDir.SUMMARY)):
        run = RunDir(summary_path.parent)
        summary = run.read_summary()
        if "final" not in summary:  # the comparison's own summary files, not a run's
            continue
        summary["history"] = run.read_metrics()
        runs.append(summary)
    return runs


def mean_std_cell(values: Sequence[float], scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """mean ± std over seeds; a single seed shows its value alone (a "± 0.00" would read as a measured spread)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return "–"
    mean, std = mean_std(present)
    head = f"{mean * scale:{'+' if signed else ''}.{digits}f}"
    return head if len(present) == 1 else f"{head} ± {std * scale:.{digits}f}"


def summary_rows(runs: list[dict], split: str, methods: Optional[Sequence[str]] = None,
                 tasks: Optional[Sequence[str]] = None, metric: str = "accuracy") -> tuple[list[str], list[dict]]:
    """Rows = methods, with per-task `metric` (accuracy or loss, over seeds), its average (per seed, then over
    seeds), the final train loss, wall times and trainable parameters."""
    tasks = ordered([r["task"] for r in runs], tasks)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    rows = []
    for method in ordered(list(by_method), methods):
        group = by_method[method]
        row = {"method": method, "seeds": sorted({r["seed"] for r in group})}
        for task in tasks:
            row[task] = [final_metric(r, split, metric) for r in group if r["task"] == task]
        per_seed = defaultdict(list)
        for r in group:
            if final_metric(r, split, metric) is not None:
                per_seed[r["seed"]].append(final_metric(r, split, metric))
        complete = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(tasks)]
        row["average"] = complete
        row["train_loss"] = [r.get("mean_train_loss_last10") for r in group]
        row["prep_seconds"] = [r["seconds"]["calibration"] + r["seconds"]["initialization"] for r in group]
        row["train_seconds"] = [r["seconds"]["training"] for r in group]
        # Whole run, wall and CPU side by side (runs made before CPU time was recorded have none).
        row["run_seconds"] = [sum(r["seconds"].values()) for r in group]
        row["cpu_seconds"] = [r.get("cpu_seconds") for r in group]
        row["trainable_parameters"] = group[0].get("trainable_parameters")
        for key in FORGETTING_KEYS:  # --forgetting-data (harness/forgetting.py); None where it was off
            row[key] = [r.get(key) for r in group]
        rows.append(row)
    return tasks, rows


FORGETTING_KEYS = ("forget_loss_before", "forget_loss_after", "forgetting")


def _with_forgetting(runs: list[dict]) -> bool:
    return any(r.get("forgetting") is not None for r in runs)


def _params(n: Optional[int]) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def markdown_table(runs: list[dict], split: str, methods=None, tasks=None, metric: str = "accuracy") -> str:
    """Accuracy in percent; `metric="loss"` gives the held-out loss (4 decimals) in the same shape."""
    tasks, rows = summary_rows(runs, split, methods, tasks, metric)
    fmt = (100.0, 2) if metric == "accuracy" else (1.0, 4)
    header = ["Method", "#Params", *tasks, "Average", "Train loss", "Calib.+init (s)", "Training (s)"]
    # CPU time beside wall time, where the runs recorded it: on a machine whose load changed between runs,
    # wall time compares the load, CPU time the work.
    with_cpu = any(v is not None for row in rows for v in row["cpu_seconds"])
    if with_cpu:
        header += ["Run wall (s)", "Run CPU (s)"]
    # Only where the runs measured it (--forgetting-data), so tables of runs without it are unchanged.
    with_forgetting = _with_forgetting(runs)
    if with_forgetting:
        header += ["Forget loss before", "Forget loss after", "Forgetting (Δ loss)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], _params(row["trainable_parameters"])]
        cells += [mean_std_cell(row[t], *fmt) for t in tasks]
        cells += [mean_std_cell(row["average"], *fmt), mean_std_cell(row["train_loss"], 1.0, 4),
                  mean_std_cell(row["prep_seconds"], 1.0, 1), mean_std_cell(row["train_seconds"], 1.0, 1)]
        if with_cpu:
            cells += [mean_std_cell(row["run_seconds"], 1.0, 1), mean_std_cell(row["cpu_seconds"], 1.0, 1)]
        if with_forgetting:
            cells += [mean_std_cell(row[k], 1.0, 4, signed=k == "forgetting") for k in FORGETTING_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _available_splits(runs: list[dict]) -> list[str]:
    return sorted({s for r in runs for s, m in r.get("final", {}).items() if m.get("accuracy") is not None})


def _load_note(runs: list[dict]) -> list[str]:
    """A sentence on the machine's load during the runs (recorded at each run's start and end), and a warning
    when it changed enough that wall times are not comparable."""
    loads = [v for r in runs for v in (r.get("load_average") or {}).values() if v is not None]
    if not loads:
        return []
    low, high = min(loads), max(loads)
    text = (f"Run CPU: CPU seconds of the run's process (all threads). Load average during the runs: "
            f"{low:.1f} to {high:.1f}.")
    if high > 1.5 * low + 1.0:
        text += " The load changed a lot between runs: compare CPU times, not wall times."
    return [text]


def write_summary(out_dir, runs: Optional[list[dict]] = None, *, split: str = "dev", methods=None, tasks=None,
                  title: str = "Comparison") -> dict:
    """summary.md, summary.csv, loss.png and grad_norm.png in `out_dir` (and forgetting.png where the runs measured
    forgetting); returns their paths."""
    out_dir = Path(out_dir)
    runs = collect_runs(out_dir) if runs is None else runs
    if not runs:
        raise ValueError(f"no finished runs under {out_dir}")
    splits = [split] + [s for s in _available_splits(runs) if s != split]
    seeds = sorted({r["seed"] for r in runs})
    md = [f"# {title}", "",
          f"Accuracy (%) as mean ± std over seeds {', '.join(map(str, seeds))} (sample std; 0 with one seed). "
          f"Average: per seed over tasks, then mean ± std. Train loss: mean of the last 10 logged steps. "
          f"Times: wall seconds per run.", *_load_note(runs), *_forgetting_note(runs), ""]
    for s in splits:
        md += [f"## {s} split", "", markdown_table(runs, s, methods, tasks), ""]
    from .plots import plot_curves, plot_forgetting  # matplotlib only where a report is written
    from .rundir import CompareDir  # the comparison folder's file names live there

    md_path, csv_path, loss_path, grad_norm_path, forgetting_path = (out_dir / name for name in CompareDir.REPORT)
    with_forgetting = _with_forgetting(runs)
    write_text_atomic(md_path, "\n".join(md))

    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        for i, s in enumerate(splits):
            task_names, rows = summary_rows(runs, s, methods, tasks)
            if i == 0:
                writer.writerow(["split", "method", "n_seeds", "trainable_parameters",
                                 *[f"{t}_{x}" for t in task_names for x in ("mean", "std")],
                                 "average_mean", "average_std", "train_loss_mean", "train_loss_std",
                                 "prep_seconds_mean", "train_seconds_mean", "run_seconds_mean", "cpu_seconds_mean",
                                 *[f"{k}_{x}" for k in FORGETTING_KEYS for x in ("mean", "std")
                                   if with_forgetting]])
            for row in rows:
                values = [v for t in task_names for v in mean_std(row[t])]
                writer.writerow([s, row["method"], len(row["seeds"]), row["trainable_parameters"], *values,
                                 *mean_std(row["average"]), *mean_std(row["train_loss"]),
                                 mean_std(row["prep_seconds"])[0], mean_std(row["train_seconds"])[0],
                                 mean_std(row["run_seconds"])[0], mean_std(row["cpu_seconds"])[0],
                                 *[v for k in FORGETTING_KEYS if with_forgetting for v in mean_std(row[k])]])
    paths = {"summary_md": md_path, "summary_csv": csv_path}
    paths["loss_png"] = plot_curves(runs, "loss", loss_path, methods=methods, tasks=tasks)
    paths["grad_norm_png"] = plot_curves(runs, "grad_norm", grad_norm_path, methods=methods, tasks=tasks)
    if with_forgetting:
        paths["forgetting_png"] = plot_forgetting(runs, split, forgetting_path, methods=methods, tasks=tasks)
    return paths


def _forgetting_note(runs: list[dict]) -> list[str]:
    if not _with_forgetting(runs):
        return []
    sources = sorted({str(r["forgetting_data"]) for r in runs if r.get("forgetting_data")})
    counts = sorted({(r["forgetting_texts"], r["forgetting_tokens"]) for r in runs if r.get("forgetting_texts")})
    return [f"Forgetting: mean token loss on held-out general text ({', '.join(sources)}; "
            + "; ".join(f"{t} texts, {n:,} tokens" for t, n in counts)
            + ") of the fine-tuned model minus that of the base model; positive: the model got worse at it."]


# ------------------------------------------------------------------------------------------ effective rank


def layer_type(name: str) -> str:
    """The name within a block: "model.layers.3.self_attn.q_proj" → "self_attn.q_proj"."""
    parts = name.split(".")
    index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[index + 1 :]) or name


def effective_rank_table(before: dict[str, float], after: dict[str, float]) -> list[dict]:
    """Per layer type (self_attn.q_proj, mlp.up_proj, …): mean effective rank over the blocks' layers."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"before": [], "after": []})
    for name, value in before.items():
        groups[layer_type(name)]["before"].append(value)
    for name, value in after.items():
        groups[layer_type(name)]["after"].append(value)
    rows = []
    for kind, values in groups.items():
        b = statistics.fmean(values["before"]) if values["before"] else math.nan
        a = statistics.fmean(values["after"]) if values["after"] else math.nan
        rows.append({"layer_type": kind, "layers": max(len(values["before"]), len(values["after"])),
                     "before": b, "after": a, "change": a - b})
    return rows


def write_effective_rank(rows: list[dict], out_dir, title: str = "Effective rank") -> dict:
    """effective_rank.md / .csv and a grouped bar chart effective_rank.png (the paper's Figure 3)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", "Effective rank (Eq. 9) of each layer type's output activations, mean over layers.",
          "", "| Layer type | Layers | Before | After | Change |", "|---|---|---|---|---|"]
    md += [f"| {r['layer_type']} | {r['layers']} | {r['before']:.2f} | {r['after']:.2f} | {r['change']:+.2f} |"
           for r in rows]
    write_text_atomic(out_dir / "effective_rank.md", "\n".join(md) + "\n")
    with atomic_path(out_dir / "effective_rank.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["layer_type", "layers", "before", "after", "change"])
        writer.writeheader()
        writer.writerows(rows)
    from .plots import plot_effective_rank  # matplotlib only where a report is written

    plot_effective_rank(rows, out_dir / "effective_rank.png", title)
    return {"md": out_dir / "effective_rank.md", "csv": out_dir / "effective_rank.csv",
            "png": out_dir / "effective_rank.png"}
