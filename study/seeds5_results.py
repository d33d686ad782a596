"""The five-seed section of docs/results_tables.md (issue 15 §5).

With three seeds on one task a two-sided sign test cannot go below p = 0.25, so the comparisons the headline
verdicts rest on (Astra's default against LoRA; `largest` at its own rate against the default) get two more
seeds. Phases seeds5-nlu and seeds5-nlg (study/run_study.py) run seeds 3 and 4 into folders of their own, with the
same commands as the main tables but the seed; here they are pooled with seeds 0-2 of the same specs in nlu-main
and nlg-main. Per kind: each spec's per-task mean ± sd over the seeds it has, then each spec against the default,
paired by task and seed, first on seeds 0-2 alone (the main table's pairs) and then on every seed, with the paired
statistics every other table uses (paired_stats.py). Partial data is shown as it is: seed counts, existing pairs.
"""

from __future__ import annotations

import pack_runs
import run_study
from paired_stats import paired_effect, sign_test

from astra_peft.harness.report import mean_std_cell

SPLIT = "test"
MAIN = {"nlu": "nlu-main", "nlg": "nlg-main"}
FIRST_SEEDS = {0, 1, 2}


def _finished(runs: list[dict]) -> dict:
    """(spec, task, seed) → the run's final test metrics, for runs that have accuracy and loss."""
    out = {}
    for r in runs:
        final = r.get("final", {}).get(SPLIT, {})
        if final.get("accuracy") is not None and final.get("loss") is not None:
            out[(r["method"], r["task"], r["seed"])] = final
    return out


def pooled(kind: str, specs: list[str], tasks: list[str]) -> dict:
    """Seeds 0-2 of `specs` from the main folder and every seed of the seeds5 folder, on `tasks`. A cell present in
    both (it should not be: the seeds differ) keeps the main folder's run."""
    extra = _finished(pack_runs.collect_runs(f"seeds5-{kind}"))
    main = {k: v for k, v in _finished(pack_runs.collect_runs(MAIN[kind])).items() if k[2] in FIRST_SEEDS}
    return {k: v for k, v in {**extra, **main}.items() if k[0] in specs and k[1] in tasks}


def _per_task(cells: dict, specs: list[str], tasks: list[str], nlg: bool) -> str:
    head = "| spec | " + " | ".join(f"{t} seeds | {t} acc. (%) | {t} loss" for t in tasks) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(tasks)]
    for spec in specs:
        row = [spec]
        for task in tasks:
            mine = sorted((s, v) for (m, t, s), v in cells.items() if m == spec and t == task)
            row += [",".join(str(s) for s, _ in mine) or "–",
                    mean_std_cell([v["accuracy"] for _, v in mine], 100.0, 2),
                    mean_std_cell([v["loss"] for _, v in mine], 1.0, 4)]
        lines.append("| " + " | ".join(row) + " |")
    what = "accuracy on the test rows and held-out loss per answer token" if nlg else "accuracy and held-out loss"
    return f"Per task, mean ± sd over the seeds each spec has ({what}):\n\n" + "\n".join(lines) + "\n"


def _versus_default(cells: dict, specs: list[str], default: str) -> str:
    rows = []
    for other in specs:
        if other == default:
            continue
        for label, seeds in (("seeds 0-2", FIRST_SEEDS), ("all seeds", None)):
            pairs = sorted((t, s) for (m, t, s) in cells
                           if m == default and (seeds is None or s in seeds) and (other, t, s) in cells)
            if not pairs:
                rows.append(f"| {other} | {label} | 0 | – | – | – | – | – | – | – |")
                continue
            a = [cells[(default, t, s)] for t, s in pairs]
            b = [cells[(other, t, s)] for t, s in pairs]
            lower = sum(x["loss"] < y["loss"] for x, y in zip(a, b))
            higher = sum(x["accuracy"] > y["accuracy"] for x, y in zip(a, b))
            loss = paired_effect([y["loss"] - x["loss"] for x, y in zip(a, b)])
            acc = paired_effect([100 * (y["accuracy"] - x["accuracy"]) for x, y in zip(a, b)])
            rows.append(f"| {other} | {label} | {len(pairs)} | {lower} | {sign_test(lower, len(pairs)):.3f} | "
                        f"{loss['mean']} | {loss['t']} | {loss['boot']} | {loss['dz']} | {higher} | "
                        f"{acc['mean']} {acc['t']} |")
    return (f"`{default}` against each other spec, paired by task and seed (cells both have), on the main table's "
            "seeds 0-2 alone and then on every seed: pairs, in how many the default has the lower held-out loss "
            "(two-sided sign test p), the mean loss difference (other − default; positive: the default is better) "
            "with its 95% intervals (paired t; paired bootstrap) and d_z, in how many pairs the default's accuracy "
            "is higher, and the mean accuracy difference in points (other − default) with its paired t interval:\n\n"
            "| spec | seeds | pairs | default lower loss | p | mean loss difference | 95% CI (paired t) | "
            "95% CI (paired bootstrap) | d_z | default higher acc. | accuracy difference, 95% CI (paired t) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def section(table: dict) -> str:
    """The markdown section for the phases seeds5-nlu and seeds5-nlg of `table` (run_study.phases())."""
    parts = ["## Five seeds (issue 15 §5)\n",
             "Seeds 3 and 4 (phases `seeds5-nlu`, `seeds5-nlg`, folders of their own) pooled with seeds 0-2 of the "
             "same specs in `nlu-main` / `nlg-main`; the main tables above keep every method at seeds 0-2.\n"]
    for kind in MAIN:
        phase = table[f"seeds5-{kind}"]
        parts.append(f"### {kind.upper()}\n")
        parts.append("```bash\n" + "\n".join(run_study.command_lines(phase)) + "\n```\n")
        try:
            first = next(iter(phase.commands()))
        except SystemExit as why:
            parts.append(f"Not runnable yet: {why}\n")
            continue
        specs = first[first.index("--methods") + 1].split(",")
        cells = pooled(kind, specs, phase.tasks)
        extra = sum(1 for (_, _, s) in cells if s not in FIRST_SEEDS)
        parts.append(f"{len(cells)} runs ({extra} of them at seeds 3-4).\n")
        if not extra:
            parts.append("No run at seeds 3-4 has finished yet.\n")
            continue
        parts.append(_per_task(cells, specs, phase.tasks, kind == "nlg"))
        default = next(s for s in specs if run_study.without_lr(s) == "astra")
        parts.append(_versus_default(cells, specs, default))
    return "\n".join(parts)
