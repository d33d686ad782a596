"""The five-seed section of docs/results_tables.md (issue 15 §5).

With three seeds on one task a two-sided sign test cannot go below p = 0.25, so the comparisons the headline
verdicts rest on (Astra's default against LoRA; `largest` at its own rate against the default) get two more
seeds. Phases seeds5-nlu and seeds5-nlg (study/run_study.py) run seeds 3 and 4 into folders of their own, with the
same commands as the main tables but the seed; here they are pooled with seeds 0-2 of the same specs in nlu-main
and nlg-main. Per kind: the usual tables (accuracy, held-out loss) over the seeds each spec has, then the default
against each spec, paired by task and seed, first on seeds 0-2 alone (the main table's pairs) and then on every
seed, with the paired statistics every other table uses (paired_stats.py). Partial data is shown as it is.
"""

from __future__ import annotations

import pack_runs
import run_study
from paired_stats import paired_with_default

from astra_peft.harness.report import markdown_table

SPLIT = "test"
MAIN = {"nlu": "nlu-main", "nlg": "nlg-main"}
FIRST_SEEDS = (0, 1, 2)


def _finished(run: dict) -> bool:
    final = run.get("final", {}).get(SPLIT, {})
    return final.get("accuracy") is not None and final.get("loss") is not None


def pooled(kind: str, specs: list[str], tasks: list[str]) -> list[dict]:
    """The finished runs of `specs` on `tasks`: seeds 0-2 from the main folder, the other seeds from the seeds5
    folder (a seed 0-2 run there, which the phase never makes, is left out rather than mixed in)."""
    main = [r for r in pack_runs.collect_runs(MAIN[kind]) if r["seed"] in FIRST_SEEDS]
    extra = [r for r in pack_runs.collect_runs(f"seeds5-{kind}") if r["seed"] not in FIRST_SEEDS]
    return [r for r in main + extra if r["method"] in specs and r["task"] in tasks and _finished(r)]


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
        runs = pooled(kind, specs, phase.tasks)
        extra = [r for r in runs if r["seed"] not in FIRST_SEEDS]
        parts.append(f"{len(runs)} runs ({len(extra)} of them at seeds 3-4).\n")
        if not extra:
            parts.append("No run at seeds 3-4 has finished yet.\n")
            continue
        parts.append("Accuracy, then held-out loss, over every seed each spec has:\n")
        parts.append(markdown_table(runs, SPLIT, methods=specs) + "\n")
        parts.append(markdown_table(runs, SPLIT, methods=specs, metric="loss") + "\n")
        for label, mine in (("Seeds 0-2 alone (the main table's pairs)", [r for r in runs if r["seed"] in FIRST_SEEDS]),
                            ("Every seed", runs)):
            paired = paired_with_default(mine, SPLIT, specs)
            parts.append(f"{label}: " + (paired or "no pair yet.\n"))
    return "\n".join(parts)
