"""Turn whatever study runs exist into docs/results_tables.md (regenerate any time; nothing hand-typed).

    python study/make_results.py

Each phase of study/run_study.py becomes a section: its commands, how many runs have finished, the
table in the paper's shape (mean ± std over seeds), and the wall time the runs cost.
The forgetting phases get, beside theirs, one section together (forgetting_results.py: issue 15 §1); the variants,
five-seed and longer-training phases one each (variants_results.py, seeds5_results.py, long_results.py).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import forgetting_results  # noqa: E402
import long_results  # noqa: E402
import seeds5_results  # noqa: E402
import variants_results  # noqa: E402
import pack_runs  # noqa: E402
import run_study  # noqa: E402
from paired_stats import BOOTSTRAP, finals as _finals, paired_effect as _paired_effect  # noqa: E402
from paired_stats import paired_with_default, sign_test as _sign_test  # noqa: E402

from astra_peft.harness.plots import plot_curves  # noqa: E402
from astra_peft.harness.report import markdown_table, mean_std_cell  # noqa: E402

OUT = HERE.parent / "docs" / "results_tables.md"
FIGURES = OUT.parent / "figures"
# the main tables' loss plots show these method families only (a dozen curves per panel would be unreadable)
MAIN_PLOT = ("astra", "lora", "pissa", "full")


def _wall_times() -> dict[str, list]:
    """Per phase, in the order phases first ran, from study/runs/wall_times.csv (one row per command the driver
    ran): [commands, failed commands, the driver's wall time in seconds]."""
    log = run_study.RUNS / "wall_times.csv"
    rows: dict[str, list] = {}
    if log.exists():
        for name, seconds, code, _ in csv.reader(log.open()):
            total = rows.setdefault(name, [0, 0, 0.0])
            total[0] += 1
            total[1] += code != "0"
            total[2] += float(seconds)
    return rows


def _cost_table(walls: dict[str, list]) -> str:
    """Per phase: commands, failed ones, and the driver's wall time in minutes of one core (the study runs one job
    per core, one thread each; a command slowed by work beside it shows that in its own row)."""
    lines = ["| phase | commands | failed | driver wall time (min of one core) |", "|---|---|---|---|"]
    lines += [f"| {name} | {n} | {failed} | {seconds / 60:.1f} |" for name, (n, failed, seconds) in walls.items()]
    return ("## Cost per phase\n\nFrom study/runs/wall_times.csv, in the order phases first ran (runs split by hand "
            "across cores in the first sessions are not in it):\n\n" + "\n".join(lines) + "\n")


EFFECT_NOTE = ("Paired comparisons (below every test table) give, beside the sign test, the mean of the paired "
               "held-out loss differences with two 95% confidence intervals: the paired t interval (mean ± "
               "t(0.975, n − 1) · sd / √n) and a paired bootstrap percentile interval "
               f"({BOOTSTRAP['resamples']:,} resamples of the pairs, NumPy RandomState seed {BOOTSTRAP['seed']}; it "
               "never reaches beyond the observed differences, and with 3 pairs the resampled means take only 10 "
               "values), and Cohen's d_z (mean difference / standard deviation of the differences). An interval that "
               "excludes 0 marks a difference at about the 5% level; pairs share a task or a seed, so they are not "
               "fully independent.\n")


def _smallest_vs_largest(runs: list[dict], split: str, printed: set) -> str:
    """Per task and seed, Astra's smallest-eigenvalue run against each `largest` twin (same options otherwise, at
    the shared or at its own learning rate): the paired comparison behind the recommended eigen_selection.
    Held-out loss beside accuracy: on 100 generation rows accuracy is noisy, the loss on the gold answer is not.
    A pair of specs already in `printed` (an earlier table's, on more tasks) is not repeated."""
    final = _finals(runs, split)
    twins = defaultdict(list)
    for method, task, seed in final:
        if "eigen_selection=largest" in method:
            twins[(run_study.without_lr(method), task, seed)].append(method)
    groups = defaultdict(list)  # one paired table per (smallest spec, largest spec)
    for (method, task, seed), a in sorted(final.items()):
        if not method.startswith("astra") or "eigen_selection" in method:
            continue
        key = run_study.without_lr(method).replace("astra", "astra:eigen_selection=largest", 1)
        for twin in sorted(twins.get((key, task, seed), [])):
            groups[(method, twin)].append((task, seed, a, final[(twin, task, seed)]))
    parts = []
    for (method, twin), pairs in groups.items():
        if (method, twin) in printed:
            continue
        printed.add((method, twin))
        acc_wins = sum(a["accuracy"] > b["accuracy"] for _, _, a, b in pairs)
        acc_ties = sum(a["accuracy"] == b["accuracy"] for _, _, a, b in pairs)
        loss_wins = sum(a["loss"] < b["loss"] for _, _, a, b in pairs)
        rows = [f"| {task} | {seed} | {100 * a['accuracy']:.2f} | {100 * b['accuracy']:.2f} | "
                f"{100 * (a['accuracy'] - b['accuracy']):+.2f} | {a['loss']:.4f} | {b['loss']:.4f} |"
                for task, seed, a, b in pairs]
        effect = _paired_effect([b["loss"] - a["loss"] for _, _, a, b in pairs])
        parts.append(f"`{method}` (smallest) vs `{twin}`, paired by task and seed: smallest ahead in accuracy in "
                     f"{acc_wins} of {len(pairs)} pairs, tied in {acc_ties}; lower held-out loss in {loss_wins} of "
                     f"{len(pairs)} (two-sided sign test p = {_sign_test(loss_wins, len(pairs)):.3f}). Mean held-out "
                     f"loss difference (largest − smallest; positive: smallest is better) {effect['mean']}, 95% CI "
                     f"(paired t) {effect['t']}, 95% CI (paired bootstrap) {effect['boot']}, d_z {effect['dz']}."
                     "\n\n| task | seed | acc. smallest | acc. largest | difference | loss smallest | "
                     "loss largest |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def _common_cells(runs: list[dict]) -> set:
    """The (task, seed) cells in which every adapter configuration of the table has a finished run. Full
    fine-tuning stays out of the intersection: it runs last, and its partial coverage would shrink every
    adapter's comparison; the like-with-like table shows it only where it has every cell."""
    by_method = defaultdict(set)
    for r in runs:
        if not run_study.is_full(r["method"]):
            by_method[r["method"]].add((r["task"], r["seed"]))
    return set.intersection(*by_method.values()) if by_method else set()


def _references(folder: str) -> str:
    """What the same test rows give without fine-tuning (study/references.py), beside the table it anchors."""
    path = run_study.RUNS / "references.json"
    if not path.exists():
        return ""
    refs = json.loads(path.read_text())
    if folder == "nlu-main":
        cells = ", ".join(f"{t} {100 * m['accuracy']:.2f}" for t, m in refs["majority"].items())
        return f"Reference, always answering the most frequent test label: {cells}.\n"
    if folder == "nlg-main":
        cells = ", ".join(f"{t} {100 * m['accuracy']:.2f} (loss {m['loss']:.4f})" for t, m in refs["zero_shot"].items())
        return f"Reference, {run_study.NLG['model']} without fine-tuning, same test rows: {cells}.\n"
    return ""


def _effective_rank() -> str:
    """Eq. 9 per layer type, before and after fine-tuning, Astra beside LoRA, from each run's `astra analyze`:
    changes as mean ± std over seeds, and per seed which method's mean change over layer types is larger."""
    parts = []
    by_task: dict = defaultdict(lambda: defaultdict(dict))  # task -> slug -> seed -> rows
    for path, rows in pack_runs.csv_rows("effective-rank", "runs/*/*/seed*/analysis/effective_rank.csv").items():
        by_task[path.parts[1]][path.parts[2]][path.parts[3]] = rows
    for task in sorted(by_task):
        found = by_task[task]
        slugs = sorted(found)
        seeds = sorted(set.intersection(*(set(found[s]) for s in slugs)))
        if not seeds:
            continue
        first = found[slugs[0]][seeds[0]]
        head = ["layer type", "layers", "before"] + [f"{s} {c}" for s in slugs for c in ("after", "change")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, row in enumerate(first):
            cells = [row["layer_type"], row["layers"], f"{float(row['before']):.2f}"]
            for slug in slugs:
                after = [float(found[slug][seed][i]["after"]) for seed in seeds]
                change = [float(found[slug][seed][i]["change"]) for seed in seeds]
                cells += [mean_std_cell(after, 1.0), mean_std_cell(change, 1.0, signed=True)]
            lines.append("| " + " | ".join(cells) + " |")
        gains = {slug: [sum(float(r["change"]) for r in found[slug][seed]) / len(first) for seed in seeds]
                 for slug in slugs}
        summary = ", ".join(f"{k} {mean_std_cell(v, 1.0, signed=True)}" for k, v in gains.items())
        if len(slugs) == 2:
            a, b = slugs
            wins = sum(x > y for x, y in zip(gains[a], gains[b]))
            summary += f"; {a} larger than {b} in {wins} of {len(seeds)} seeds"
        parts.append(f"Effective rank (Eq. 9), `{task}`, mean over the layers of each type, 128 test rows, "
                     f"seeds {', '.join(x.removeprefix('seed') for x in seeds)} (mean ± std over seeds); mean change "
                     f"over layer types: {summary}:\n\n"
                     + "\n".join(lines) + "\n")
    return "\n".join(parts)


def _command_methods(phase) -> list[str]:
    """The --methods of the phase's first command, in order (empty where its tuning has not finished)."""
    try:
        for cmd in phase.commands():
            return cmd[cmd.index("--methods") + 1].split(",")
    except SystemExit:
        pass
    return []


def main():
    os.chdir(run_study.ROOT)
    walls = _wall_times()
    parts = [
        "# Study tables (generated by `python study/make_results.py`; do not edit)\n",
        f"Settings: NLU {run_study.NLU}; NLG {run_study.NLG}. Adapter learning-rate grid "
        f"{run_study.ADAPTER_LRS}, full fine-tuning {run_study.FULL_LRS}, tuned on dev, seed 0.\n",
        EFFECT_NOTE,
    ]
    table = run_study.phases()
    printed_pairs: set = set()

    def folder_wall(folder: str) -> float:
        return sum(seconds for name, (_, _, seconds) in walls.items() if name in table and table[name].folder == folder)

    for name, phase in table.items():
        if name.startswith("seeds5-"):  # pooled with the main folders' seeds in their own section, at the end
            continue
        if not phase.table:
            parts.append(f"## {name}\n\nOrders runs of `{phase.folder}` (its table shows them):\n")
            parts.append("```bash\n" + "\n".join(run_study.command_lines(phase)) + "\n```\n")
            continue
        split = "dev" if name in run_study.TUNE_METRIC else "test"  # tuning reads dev only
        runs = run_study.phase_runs(phase)
        parts.append(f"## {name}\n")
        parts.append("```bash\n" + "\n".join(run_study.command_lines(phase)) + "\n```\n")
        if not runs:
            parts.append("No finished runs yet.\n")
            continue
        run_seconds = sum(sum(r["seconds"].values()) for r in runs)
        parts.append(
            f"{len(runs)} finished runs; their own wall time {run_seconds / 60:.1f} min "
            f"(driver wall time of the phases writing `{phase.folder}`: {folder_wall(phase.folder) / 60:.1f} min). "
            f"Split: {split}.\n"
        )
        order = run_study.phase_methods(phase)
        if split == "test":
            parts.append(_references(phase.folder))
        parts.append(markdown_table(runs, split, methods=order) + "\n")
        if phase.folder.startswith("nlg"):
            parts.append("Held-out loss per answer token on the same rows (lower is better):\n")
            parts.append(markdown_table(runs, split, methods=order, metric="loss") + "\n")
        common = _common_cells(runs)
        if common and common < {(r["task"], r["seed"]) for r in runs}:
            same = [r for r in runs if (r["task"], r["seed"]) in common]
            have = defaultdict(set)
            for r in same:
                have[r["method"]].add((r["task"], r["seed"]))
            missing = sorted(m for m in {r["method"] for r in runs} if have[m] != common)
            same = [r for r in same if r["method"] not in missing]
            cells = ", ".join(f"{t} {','.join(str(s) for u, s in sorted(common) if u == t)}"
                              for t in sorted({t for t, _ in common}))
            parts.append(f"The same on the task and seed cells every adapter configuration has finished (seeds: "
                         f"{cells}), so rows compare like with like"
                         + (f"; left out for missing some of them: {', '.join(missing)}" if missing else "")
                         + (". Accuracy, then held-out loss:\n" if phase.folder.startswith("nlg") else ":\n"))
            parts.append(markdown_table(same, split, methods=order) + "\n")
            if phase.folder.startswith("nlg"):
                parts.append(markdown_table(same, split, methods=order, metric="loss") + "\n")
        shown = order or sorted({r["method"] for r in runs})
        if name.endswith("-main"):
            shown = [m for m in shown if m.split(":")[0] in MAIN_PLOT]
        FIGURES.mkdir(exist_ok=True)
        plot_curves([r for r in runs if r["method"] in shown], "loss", FIGURES / f"{name}_loss.png", methods=shown)
        parts.append(f"Training loss, mean over seeds (shaded: min to max):\n\n![{name}](figures/{name}_loss.png)\n")
        if split == "test":
            parts.append(paired_with_default(runs, split, order))
        paired = _smallest_vs_largest(runs, split, printed_pairs)
        if paired:
            parts.append(paired)
        if name == "effective-rank":
            parts.append(_effective_rank())
    forget = {task: run_study.phase_runs(table[f"forgetting-{task}"]) for task in run_study.FORGET_TASKS}
    first = table[f"forgetting-{run_study.FORGET_TASKS[0]}"]
    parts.append(forgetting_results.section(forget, FIGURES, order=_command_methods(first)))
    parts.append(variants_results.section(table))
    parts.append(seeds5_results.section(table))
    parts.append(long_results.section(table))
    parts.append(_cost_table(walls))
    OUT.write_text("\n".join(parts))
    print(f"wrote {OUT}")
    for folder in pack_runs.folders():
        loose = pack_runs.unpacked_only(folder)
        if loose:
            print(f"note: {len(loose)} run folders under study/runs/{folder} are not packed yet (tabled all the same); "
                  f"before committing: python study/pack_runs.py pack {folder}")


if __name__ == "__main__":
    main()
