"""The forgetting section of docs/results_tables.md (issue 15 §1), and its figure docs/figures/forgetting_pareto.png.

make_results.py calls `section` with the runs of the phases forgetting-<task> (study/run_study.py): every method's
held-out task loss and accuracy beside the loss of the same model on held-out general text (xsum articles, neither
training nor calibration data; astra_peft/harness/forgetting.py) before and after fine-tuning, per task and method as
mean ± sd over the seeds that have finished; then each method against LoRA, paired by task and seed on the cells
both have finished, with the paired statistics every other table uses (paired_stats.py); and the Pareto front of
task loss against forgetting. Partial data (a method behind on seeds, or missing) is shown as it is: its seed count,
and only the pairs that exist.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

import run_study
from paired_stats import paired_effect, sign_test

from astra_peft.harness.plots import pareto_front, plot_forgetting
from astra_peft.harness.report import mean_std_cell

SPLIT = "test"
FIGURE = "forgetting_pareto.png"


def usable(run: dict) -> bool:
    """A finished run with a test loss and a forgetting measure (the rest is counted, never filled in)."""
    return (run.get("forgetting") is not None and run.get("forget_loss_before") is not None
            and run.get("final", {}).get(SPLIT, {}).get("loss") is not None)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _ordered(methods, order) -> list[str]:
    order = list(order or [])
    return [m for m in order if m in methods] + sorted(m for m in set(methods) if m not in order)


def summarise(runs: list[dict], order=None) -> dict[str, dict]:
    """Per method (in `order`, then the rest sorted): its seeds, and mean and sd of test loss, test accuracy,
    forget loss before and after, and forgetting, over its usable runs of one task."""
    out = {}
    for method in _ordered({r["method"] for r in runs}, order):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        out[method] = {
            "seeds": [r["seed"] for r in mine],
            "loss": [r["final"][SPLIT]["loss"] for r in mine],
            "accuracy": [r["final"][SPLIT].get("accuracy") for r in mine],
            "before": [r["forget_loss_before"] for r in mine],
            "after": [r["forget_loss_after"] for r in mine],
            "forgetting": [r["forgetting"] for r in mine],
        }
    return out


def _task_table(task: str, rows: dict[str, dict]) -> str:
    means = {m: (_mean_sd(r["loss"])[0], _mean_sd(r["forgetting"])[0]) for m, r in rows.items()}
    front = pareto_front(means)
    lines = ["| method | seeds | test loss | test acc. (%) | forget loss before | forget loss after | forgetting "
             "(after − before) | Pareto front |", "|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {len(r['seeds'])} ({','.join(str(s) for s in r['seeds'])}) | "
                     f"{mean_std_cell(r['loss'], 1.0, 4)} | {mean_std_cell(r['accuracy'], 100.0, 2)} | "
                     f"{mean_std_cell(r['before'], 1.0, 4)} | {mean_std_cell(r['after'], 1.0, 4)} | "
                     f"{mean_std_cell(r['forgetting'], 1.0, 4, signed=True)} | {'yes' if m in front else ''} |")
    return f"`{task}`, mean ± sd over seeds (a single seed shows its value alone):\n\n" + "\n".join(lines) + "\n"


def _lora(methods) -> Optional[str]:
    return next((m for m in methods if run_study.without_lr(m) == "lora"), None)


def _versus_lora(runs: list[dict], order) -> str:
    """Each method against LoRA, paired by (task, seed) on the cells both have."""
    cell = {(r["method"], r["task"], r["seed"]): r for r in runs}
    methods = _ordered({r["method"] for r in runs}, order)
    lora = _lora(methods)
    if lora is None:
        return "No LoRA run has finished yet, so there is no paired comparison with LoRA.\n"
    if methods == [lora]:
        return f"No method but `{lora}` has finished yet, so there is no paired comparison with LoRA.\n"
    rows = []
    for other in methods:
        if other == lora:
            continue
        pairs = sorted((t, s) for m, t, s in cell if m == other and (lora, t, s) in cell)
        if not pairs:
            rows.append(f"| {other} | 0 | – | – | – | – | – | – | – | – | – |")
            continue
        a = [cell[(other, t, s)] for t, s in pairs]
        b = [cell[(lora, t, s)] for t, s in pairs]
        forget = paired_effect([x["forgetting"] - y["forgetting"] for x, y in zip(a, b)])
        loss = paired_effect([x["final"][SPLIT]["loss"] - y["final"][SPLIT]["loss"] for x, y in zip(a, b)])
        more = sum(x["forgetting"] > y["forgetting"] for x, y in zip(a, b))
        lora_total = sum(y["forgetting"] for y in b)
        # a ratio only where LoRA's forgetting is positive: of a negative or zero one it would mean nothing
        ratio = f"{sum(x['forgetting'] for x in a) / lora_total:.2f}" if lora_total > 0 else "–"
        where = "; ".join(f"{t} {','.join(str(s) for u, s in pairs if u == t)}" for t in sorted({t for t, _ in pairs}))
        rows.append(f"| {other} | {len(pairs)} ({where}) | {more} | {sign_test(more, len(pairs)):.3f} | "
                    f"{forget['mean']} | {forget['t']} | {forget['boot']} | {forget['dz']} | {ratio} | "
                    f"{loss['mean']} | {loss['t']} |")
    return (f"Each method against `{lora}`, paired by task and seed on the cells both have finished: in how many "
            "pairs it forgets more than LoRA (two-sided sign test p), the mean forgetting difference (method − LoRA; "
            "positive: forgets more than LoRA) with its 95% confidence intervals (paired t; paired bootstrap) and "
            "Cohen's d_z, its forgetting as a multiple of LoRA's over the same pairs (sum over sum; only where "
            "LoRA's is positive), and the mean test-loss difference (method − LoRA; negative: better on the task) "
            "with its paired t interval:\n\n"
            "| method | pairs (task seeds) | forgets more | p | mean Δ forgetting | 95% CI (paired t) | "
            "95% CI (paired bootstrap) | d_z | forgetting ÷ LoRA's | mean Δ test loss | 95% CI (paired t) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def section(runs_by_task: dict[str, list[dict]], figures: Path, order=None) -> str:
    """The markdown section: settings, per-task tables, the paired comparison with LoRA, the figure (written to
    `figures`/forgetting_pareto.png when any run is usable)."""
    parts = ["## Forgetting (issue 15 §1)\n"]
    every = [r for runs in runs_by_task.values() for r in runs]
    runs = [r for r in every if usable(r)]
    if len(runs) < len(every):
        parts.append(f"Left out: {len(every) - len(runs)} finished runs without a forgetting measure or a "
                     f"{SPLIT} loss.\n")
    if not runs:
        parts.append("No finished runs with a forgetting measure yet.\n")
        return "\n".join(parts)
    texts = sorted({(r.get("forgetting_data"), r.get("forgetting_texts"), r.get("forgetting_tokens")) for r in runs},
                   key=str)
    sources = "; ".join(f"{n} held-out {d} texts, {t:,} tokens" if t is not None else f"{n} held-out {d} texts"
                        for d, n, t in texts)
    models = ", ".join(sorted({str(r.get("model")) for r in runs}))
    parts.append(f"{models}: the mean token loss on general text that is neither training nor calibration data "
                 f"({sources}), on the base model before the method is built and on the fine-tuned model after "
                 f"training; forgetting = after − before (positive: fine-tuning made the model worse on that text). "
                 f"Task loss: held-out loss per answer token on the {SPLIT} rows, accuracy on the same rows. "
                 f"Pareto front: the methods no other method beats on both mean task loss and mean forgetting (of "
                 f"the means only: with this few seeds the spreads of neighbours overlap). Runs finished: "
                 + ", ".join(f"{task} {sum(r['task'] == task for r in runs)}" for task in runs_by_task) + ".\n")
    by_task = {}
    for task in runs_by_task:
        mine = [r for r in runs if r["task"] == task]
        if mine:
            by_task[task] = summarise(mine, order)
            parts.append(_task_table(task, by_task[task]))
    parts.append(_versus_lora(runs, order))
    figures.mkdir(parents=True, exist_ok=True)
    plot_forgetting(runs, SPLIT, figures / FIGURE, methods=order, tasks=list(by_task), title=models)
    parts.append(f"Task loss against forgetting, one point per method and task (error bars: sd over seeds; n: "
                 f"seeds):\n\n![forgetting]({figures.name}/{FIGURE})\n")
    return "\n".join(parts)
