"""The longer-training section of docs/results_tables.md (issue 15 §2): does the ranking survive 5× the budget?

Phases long-lr-{nlu,nlg} re-tune each of LoRA, Astra's two ends and PiSSA at 5× the steps (dev, seed 0, one
task of each kind: `mr`, `social-iqa`), and long-main-{nlu,nlg} run each at its own 5×-budget rate on test at
seeds 0-2. Here they are set beside the same four methods at the main study's budget, taken from nlu-main /
nlg-main at the rates the main tables use (seeds 0-2, the same task), so the two budgets differ only in steps and
in the rate each budget's tuning chose. Per kind: the rates, mean ± std of both metrics at both budgets, the order
by the kind's verdict metric (accuracy for classification, held-out loss for generation, as in the main tables),
and every method against LoRA paired by seed at each budget. Whether the order changed is said only when all four
methods have all three seeds at both budgets; partial data is shown as it is and called so.
"""

from __future__ import annotations

import statistics
from typing import Optional

import pack_runs
import run_study
from paired_stats import finals, paired_effect, sign_test

from astra_peft.harness.report import mean_std_cell

SPLIT = "test"
SEEDS = (0, 1, 2)
LABEL = {"1x": "1×", "5x": "5×"}  # the two budgets: the main tables' steps and 5× them
LARGEST = "astra:eigen_selection=largest"
# per kind: the main tables' settings and folder, their shared adapter-rate tuning, the own-rate tuning of `largest`,
# the verdict metric
KINDS = {"nlu": dict(cfg=run_study.NLU, main="nlu-main", tune="nlu-lr", largest="nlu-lr-largest", metric="accuracy"),
         "nlg": dict(cfg=run_study.NLG, main="nlg-main", tune="nlg-lr", largest="nlg-lr-largest", metric="loss")}


def _tuned(phase: str, methods: list[str]) -> Optional[str]:
    try:
        return run_study.tuned_lr(phase, methods, run_study.ADAPTER_LRS)
    except SystemExit:  # that tuning has not finished
        return None


def rates(kind: str) -> dict[str, dict[str, Optional[str]]]:
    """method → {"1x": the rate the main tables run it at, "5x": the rate long-lr-<kind> chose} (None: not tuned
    yet). At 1× the rules of run_study's main tables: `largest` its own rate, on NLG PiSSA too (OWN_FAMILY_NLG,
    from nlg-lr-baselines), the others LoRA's and Astra's shared rate."""
    k = KINDS[kind]
    shared = _tuned(k["tune"], ["lora", "astra"])
    out = {}
    for m in run_study.LONG_METHODS:
        if m == LARGEST:
            one = _tuned(k["largest"], [m])
        elif kind == "nlg" and m in run_study.OWN_FAMILY_NLG:
            one = _tuned("nlg-lr-baselines", [m])
        else:
            one = shared
        out[m] = {"1x": one, "5x": _tuned(f"long-lr-{kind}", [m])}
    return out


def cells(runs: list[dict], method: str, lr: Optional[str], task: str) -> dict[int, dict]:
    """seed → final test metrics of `method` at `lr` on `task` (seeds 0-2, finished runs only)."""
    if lr is None:
        return {}
    spec = f"{method}:lr={lr}"
    return {s: final for (m, t, s), final in finals(runs, SPLIT).items()
            if m == spec and t == task and s in SEEDS and final.get("loss") is not None}


def _cell(values: list[float], scale: float, digits: int) -> str:
    return mean_std_cell(values, scale, digits) + (f" (n={len(values)})" if values else "")


def order(means: dict[str, float], metric: str) -> str:
    """Methods best first by `metric` (higher accuracy, lower loss); equal means joined by '='."""
    ranked = sorted(means, key=lambda m: -means[m] if metric == "accuracy" else means[m])
    text = ranked[0] if ranked else ""
    for before, m in zip(ranked, ranked[1:]):
        text += (" = " if means[m] == means[before] else " > ") + m
    return text


def _verdict(effect: dict) -> str:
    """Loss against LoRA by the paired t interval: 'lower' or 'higher' where it excludes 0, else 'level'."""
    if "t_range" not in effect:
        return "–"
    low, high = effect["t_range"]
    return "lower" if high < 0 else "higher" if low > 0 else "level"


def _paired_rows(budget: str, by_method: dict[str, dict[int, dict]]) -> list[str]:
    lora = by_method.get("lora", {})
    rows = []
    for m, mine in by_method.items():
        seeds = sorted(set(mine) & set(lora))
        if m == "lora" or not seeds:
            continue
        d_loss = [mine[s]["loss"] - lora[s]["loss"] for s in seeds]
        d_acc = [100 * (mine[s]["accuracy"] - lora[s]["accuracy"]) for s in seeds]
        lower = sum(d < 0 for d in d_loss)
        effect = paired_effect(d_loss)
        rows.append(f"| {m} | {budget} | {len(seeds)} | {lower} | {sign_test(lower, len(seeds)):.3f} | "
                    f"{effect['mean']} | {effect['t']} | {effect['boot']} | {_verdict(effect)} | "
                    f"{statistics.fmean(d_acc):+.2f} |")
    return rows


def kind_section(kind: str, main_runs: list[dict], long_runs: list[dict]) -> str:
    """The comparison for one kind from the runs of its main folder and of long-main-<kind>."""
    k, task = KINDS[kind], run_study.LONG[kind][1]
    steps = {"1x": k["cfg"]["steps"], "5x": run_study.LONG[kind][0]["steps"]}
    lrs = rates(kind)
    found = {b: {m: cells(main_runs if b == "1x" else long_runs, m, lrs[m][b], task) for m in lrs}
             for b in ("1x", "5x")}
    lines = [f"### {kind.upper()}: `{task}`, {steps['1x']} steps (main tables) against {steps['5x']} steps\n",
             "| method | rate 1× | rate 5× | accuracy 1× | accuracy 5× | held-out loss 1× | held-out loss 5× |",
             "|---|---|---|---|---|---|---|"]
    for m in lrs:
        acc = {b: [c["accuracy"] for c in found[b][m].values()] for b in found}
        loss = {b: [c["loss"] for c in found[b][m].values()] for b in found}
        lines.append(f"| {m} | {lrs[m]['1x'] or 'not tuned'} | {lrs[m]['5x'] or 'not tuned'} | "
                     f"{_cell(acc['1x'], 100, 2)} | {_cell(acc['5x'], 100, 2)} | "
                     f"{_cell(loss['1x'], 1, 4)} | {_cell(loss['5x'], 1, 4)} |")
    lines.append("")
    metric = k["metric"]
    complete = all(len(found[b][m]) == len(SEEDS) for b in found for m in lrs)
    orders = {b: order({m: statistics.fmean(c[metric] for c in found[b][m].values()) for m in lrs if found[b][m]},
                       metric) for b in found}
    for b in found:
        lines.append(f"Order by mean {metric} at {LABEL[b]}: {orders[b] or 'no run yet'}  ")
    if complete:
        lines.append(f"**Order {'unchanged' if orders['1x'] == orders['5x'] else 'changed'}** at 5× the budget "
                     f"(all {len(lrs)} methods × {len(SEEDS)} seeds at both budgets).\n")
    else:
        have = sum(len(found["5x"][m]) for m in lrs)
        untuned = [m for m in lrs if lrs[m]["5x"] is None]
        lines.append(f"Not decidable yet: {have} of {len(lrs) * len(SEEDS)} runs at 5× have finished"
                     + (f" (not yet tuned at 5×: {', '.join(untuned)})" if untuned else "") + ".\n")
    rows = _paired_rows(LABEL["1x"], found["1x"]) + _paired_rows(LABEL["5x"], found["5x"])
    if rows:
        lines += ["Each method against LoRA at the same budget, paired by seed: pairs, in how many its held-out loss "
                  "is lower (two-sided sign test p), the mean loss difference (method − LoRA; negative: better than "
                  "LoRA) with its 95% intervals (paired t; paired bootstrap), the loss against LoRA by the t "
                  "interval (lower or higher where it excludes 0, else level: the order that is more than noise), "
                  "and the mean accuracy difference in points:\n",
                  "| method | budget | pairs | lower loss | p | mean loss difference | 95% CI (paired t) | "
                  "95% CI (paired bootstrap) | loss vs LoRA | mean accuracy difference |",
                  "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    return "\n".join(lines)


def section(table: dict) -> str:
    """The markdown section for issue 15 §2 from the phases long-lr-* / long-main-* of `table` (run_study.phases())."""
    parts = ["## Longer training (issue 15 §2)\n",
             "LoRA, Astra's two ends and PiSSA at 5× the steps, each at the rate `long-lr-<kind>` tuned for that "
             "budget (dev, seed 0), seeds 0-2 on test (`long-main-<kind>`), beside the same methods at the main "
             "tables' budget and rates (seeds 0-2 of the main folder).\n"]
    for kind, k in KINDS.items():
        parts.append("```bash\n" + "\n".join(run_study.command_lines(table[f"long-main-{kind}"])) + "\n```\n")
        parts.append(kind_section(kind, pack_runs.collect_runs(k["main"]),
                                  pack_runs.collect_runs(f"long-main-{kind}")))
    return "\n".join(parts)
