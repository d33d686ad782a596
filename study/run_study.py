"""The reproduction study (docs/results.md), as resumable `astra compare` batches.

    python study/run_study.py --list                 # phases, their commands and how far each got
    python study/run_study.py nlu-lr nlu-main        # run phases in order; finished runs are skipped
    python study/run_study.py all --dry-run

Every number in docs/results.md comes from a run directory that `astra compare` wrote under
study/runs/<folder>/, which `study/make_results.py` turns into the tables. Run directories hold no weights
(--no-save-weights); study/pack_runs.py folds each folder into one committed file, study/runs/<folder>.jsonl.gz,
byte for byte. Before a phase runs, its folder is unpacked (so `astra compare` sees the finished runs and skips
them) and after each command it is packed again: a later session continues where an interrupted one stopped.

A phase may also run on both cores at once: start it twice (one process per core, OMP_NUM_THREADS=1, taskset). Each
`astra compare` skips the run the other is writing (its lock file), unpacking leaves run folders on disk alone, and
each pack folds in every run folder on disk; a phase that reads this one's tuning may start only when both are done.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import pack_runs  # noqa: E402

RUNS = Path("study") / "runs"  # relative to ROOT, where both scripts run, so printed commands are portable
ASTRA = ["python", "-m", "astra_peft.harness.cli"]

# --- the settings every run of a model shares (stated in docs/results.md) --------------------------------
NLU = dict(model="minilm-l6", rank=8, alpha=16, batch=16, max_length=128, steps=150, eval_samples=500)
NLG = dict(model="smollm2-135m", rank=8, alpha=8, batch=4, max_length=160, steps=60, eval_samples=100)
NLU_TASKS = ["mr", "intent", "strategyqa-yn", "nli"]  # nli last: its long rows make a run ~5 min, 3x the others
NLG_TASKS = ["strategyqa", "math-qa", "social-iqa"]
NLU_METHODS = ["astra", "astra:eigen_selection=largest", "lora", "rslora", "dora", "pissa", "milora", "olora",
               "corda", "lora-ga", "eva", "full"]
NLG_METHODS = ["astra", "astra:eigen_selection=largest", "lora", "pissa", "milora", "corda", "lora-ga", "full"]
NLG_PAIRS = NLG_METHODS[:3]
TUNE_METRIC = {"nlu-lr": "accuracy", "nlu-lr-largest": "accuracy", "nlg-lr": "loss", "nlg-lr-largest": "loss",
               "nlg-lr-baselines": "loss", "nlg-lr-selections": "loss", "nlg-lr-ranks": "loss",
               "long-lr-nlu": "accuracy", "long-lr-nlg": "loss"}
# On SmolLM2, `largest` needed a rate 20x below LoRA's: a method that starts in W's principal directions (PiSSA) or
# rescales its factors (CorDA, LoRA-GA) is its own family there and gets its own tuned rate. MiLoRA starts in the
# minor singular directions, as Astra-smallest does in the tail, and shares LoRA's and Astra's rate.
OWN_FAMILY_NLG = ["pissa", "corda", "lora-ga"]
# Table 4's other eigenvector selections: `largest` diverged at the tail's rate, so each gets its own tuned rate too
SELECTIONS = [f"astra:eigen_selection={s}" for s in ("middle", "lower_quartile", "upper_quartile", "random")]
# Figure 1's larger ranks (α = r), each tuned on its own for the same reason: the rate was tuned at r = 8
RANKED = ["astra:rank=32:alpha=32", "astra:rank=128:alpha=128", "lora:rank=128:alpha=128"]
ABLATION_TASK = "strategyqa"  # the NLG task of every ablation (and of NLG learning-rate tuning)
SEEDS = "0,1,2"
# Issue 15 §1: forgetting, on the two cheapest NLG tasks (social-iqa ~2.5 min a run, math-qa ~4.5), each its own
# folder so the two can run side by side (one core each). The texts: 32 held-out xsum articles of <= 256 tokens,
# scored before and after fine-tuning (~20 s each way on one core), the same for every method and seed.
FORGET_TASKS = ["social-iqa", "math-qa"]
FORGET_METHODS = ["lora", "astra", "pissa", "milora", "corda", "corda:corda_method=kpm", "lora-ga", "full"]
FORGET_FLAGS = ["--forgetting-data", "xsum", "--forgetting-samples", "32", "--forgetting-max-length", "256"]
# Issue 15 §6's two pre-registered variants (docs/results.md): `largest`'s B = Q, A rescaled to LoRA's size or A = 0
VARIANTS = [f"astra:eigen_selection=largest:factor_init={f}" for f in ("lora_scale", "zero_a")]
VARIANTS_COMMIT = "acd9cf1"  # the last commit with AstraConfig.factor_init, where the variants' commands run
VARIANTS_RETIRED = (f"AstraConfig.factor_init was removed after issue 15 §6's pre-registered decision "
                    f"(docs/results.md); these commands run at commit {VARIANTS_COMMIT} "
                    f"(git checkout {VARIANTS_COMMIT})")
# Issue 15 §2: does the ranking survive 5x the training budget? One learned task of each kind, the four methods
# whose order the verdicts rest on, each tuned on its own at that budget (dev, seed 0), then 3 seeds on test.
# Cost on one core (runs scale with steps): mr ~7.5 min a run, social-iqa ~12; 24 + 24 runs, about 8 hours.
LONG = {"nlu": (dict(NLU, steps=5 * NLU["steps"]), "mr"), "nlg": (dict(NLG, steps=5 * NLG["steps"]), "social-iqa")}
LONG_METHODS = ["lora", "astra", "astra:eigen_selection=largest", "pissa"]
EFFECTIVE_RANK = [(NLU, "mr", "nlu-lr"), (NLG, "social-iqa", "nlg-lr")]  # one task of each kind
# Issue 15 §5: the comparisons the headline verdicts rest on (Astra's default against LoRA, and `largest` at its own
# rate against the default) at two more seeds, in folders of their own so the main tables keep every method at the
# same three seeds; study/seeds5_results.py pools them with seeds 0-2 of nlu-main / nlg-main.
EXTRA_SEEDS = "3,4"
# learning-rate grids, tuned per method family on the dev split of one task, seed 0
ADAPTER_LRS = ["1e-4", "5e-4", "2e-3"]
FULL_LRS = ["2e-5", "1e-4", "5e-4"]


def common(cfg: dict, steps: int | None = None) -> list[str]:
    return ["--model", cfg["model"], "--rank", str(cfg["rank"]), "--alpha", str(cfg["alpha"]),
            "--batch-size", str(cfg["batch"]), "--max-length", str(cfg["max_length"]),
            "--max-steps", str(steps or cfg["steps"]), "--eval-samples", str(cfg["eval_samples"]),
            "--no-save-weights", "--no-progress"]


def tuned_lr(phase: str, family_methods: list[str], grid: list[str]) -> str:
    """The grid value with the best mean dev score over `family_methods` in a finished tuning phase: accuracy
    for the classification tuning, held-out loss for generation (on 100 rows near chance, SmolLM2's accuracy
    moves by noise; the loss on the gold answers does not)."""
    metric = TUNE_METRIC[phase]
    scores: dict[str, list[float]] = {lr: [] for lr in grid}
    for s in pack_runs.collect_runs(phase):
        base, lr = without_lr(s.get("method", "")), s.get("lr")
        spec_lr = next((g for g in grid if float(g) == float(lr)), None)
        if base in family_methods and spec_lr is not None:
            scores[spec_lr].append(s["final"]["dev"][metric])
    done = {lr: sum(v) / len(v) for lr, v in scores.items() if v}
    if len(done) < len(grid):
        raise SystemExit(f"Phase '{phase}' has not finished: run it first (missing {sorted(set(grid) - set(done))}).")
    return (max if metric == "accuracy" else min)(done, key=done.get)


def without_lr(spec: str) -> str:
    return ":".join(part for part in spec.split(":") if not part.startswith("lr="))


def is_full(spec: str) -> bool:
    return spec.split(":")[0] == "full"


@dataclass
class Phase:
    """A phase: its compare commands (built lazily: later phases read the tuning runs), and which runs of which
    folder make its table. The NLG ablations share `nlg-main`'s folder: a configuration that appears in several
    tables (Astra's defaults, say, in Tables 2, 4, the statistic and the calibration ablations) runs once."""

    commands: Callable[[], Iterator[list[str]]]  # a generator: a command is built only when the one before ran
    folder: str
    methods: Optional[Callable[[], list[str]]] = None  # spec names in the table (None: every run in the folder)
    tasks: Optional[list[str]] = None
    table: bool = True  # False for a phase that only orders runs another phase's table shows
    # Set for a phase whose commands need code this tree no longer has (an experimental option removed after its
    # decision): why, and the commit to check out to run them again. Its runs stay packed and tabled.
    retired: Optional[str] = None


def phases() -> dict[str, Phase]:
    largest = "astra:eigen_selection=largest"

    def tuning(cfg, task, out, families=(("lora", "astra"), ("full",))):
        grid = [f"{m}:lr={lr}" for family in families for m in family
                for lr in (FULL_LRS if family == ("full",) else ADAPTER_LRS)]
        yield ASTRA + ["compare", "--task", task, "--methods", ",".join(grid), "--seeds", "0",
                       "--eval-split", "dev", "--output", str(RUNS / out)] + common(cfg)

    def specs(methods, tune, strict=True, own=()):
        """Methods with their tuned learning rates: adapters LoRA's and Astra's, full fine-tuning its own, and
        each method of `own` its own from nlg-lr-baselines. With strict=False, a method whose tuning is
        unfinished is left out (rather than refused)."""
        adapter, out = tuned_lr(tune, ["lora", "astra"], ADAPTER_LRS), []
        for m in methods:
            try:
                if is_full(m):
                    out.append(f"{m}:lr={tuned_lr(tune, ['full'], FULL_LRS)}")
                elif m in own:
                    out.append(f"{m}:lr={tuned_lr('nlg-lr-baselines', [m], ADAPTER_LRS)}")
                else:
                    out.append(f"{m}:lr={adapter}")
            except SystemExit:
                if strict:
                    raise
        return out

    def compare(cfg, tasks, methods, seeds, out):
        return ASTRA + ["compare", "--tasks", ",".join(tasks), "--methods", ",".join(methods), "--seeds", seeds,
                        "--eval-split", "test", "--output", str(RUNS / out)] + common(cfg)

    def main_table(cfg, tasks, methods, tune, out, seed_major=False, own=()):
        """Adapters first, full fine-tuning last: adapter columns need only the adapter learning rates, so
        they run while full fine-tuning's tuning is pending. seed_major runs every method on every task at
        seed 0 before seed 1, so an interrupted phase leaves every column at the same seeds."""
        adapters = [m for m in methods if not is_full(m)]
        if seed_major:
            for seed in SEEDS.split(","):
                for task in tasks:
                    yield compare(cfg, [task], specs(adapters, tune, own=own), seed, out)
        else:
            for task in tasks:
                yield compare(cfg, [task], specs(adapters, tune, own=own), SEEDS, out)
        if any(is_full(m) for m in methods):
            yield compare(cfg, tasks, specs([m for m in methods if is_full(m)], tune), SEEDS, out)

    def effective_rank():
        """Per kind of task (MiniLM on mr, SmolLM2 on social-iqa): fine-tune Astra and LoRA keeping the weights
        (a MiniLM model, a SmolLM2 adapter: small), then measure Eq. 9 before and after on 128 test rows."""
        out = RUNS / "effective-rank"
        for cfg, task, tune in EFFECTIVE_RANK:
            a = tuned_lr(tune, ["lora", "astra"], ADAPTER_LRS)
            yield ASTRA + ["compare", "--task", task, "--methods", f"astra:lr={a},lora:lr={a}", "--seeds", SEEDS,
                           "--eval-split", "test", "--output", str(out)] + \
                [c for c in common(cfg) if c != "--no-save-weights"]
            for slug in sorted(_slugs(out, task)):
                for seed in SEEDS.split(","):
                    yield ASTRA + ["analyze", str(out / "runs" / task / slug / f"seed{seed}"), "--split", "test",
                                   "--samples", "128"]

    def own_lr(method, tune):
        return f"{method}:lr={tuned_lr(tune, [method], ADAPTER_LRS)}"

    def with_own_rates(shared, methods, tune):
        """A table's specs plus each of `methods` at its own rate from `tune`, where that is tuned and not the
        shared rate (then the table already has those runs)."""
        out = list(shared)
        for m in methods:
            try:
                own = own_lr(m, tune)
            except SystemExit:
                continue
            if own not in out:
                out.append(own)
        return out

    def own_rate_runs(cfg, tasks, methods, tune, shared_tune, out):
        """`methods` at their own rates from `tune` on every task, seed by seed, but those whose own rate is the
        shared one (the main table or ablation has those runs)."""
        own = [o for o in (own_lr(m, tune) for m in methods) if o not in specs(methods, shared_tune)]
        if not own:
            return
        for seed in SEEDS.split(","):
            for task in tasks:
                yield compare(cfg, [task], own, seed, out)

    def forgetting(task):
        """Issue 15 §1: every method of FORGET_METHODS at the rate of the main table (CorDA's kpm at CorDA's tuned
        rate: the mode changes which directions are kept, not the scale), and `largest` at its own rate, seed by
        seed, so an interrupted phase leaves every method at the same seeds."""
        kpm = "corda:corda_method=kpm"
        methods = specs([m for m in FORGET_METHODS if m != kpm], "nlg-lr", own=OWN_FAMILY_NLG)
        corda_lr = tuned_lr("nlg-lr-baselines", ["corda"], ADAPTER_LRS)
        methods.insert(methods.index(f"corda:lr={corda_lr}") + 1, f"{kpm}:lr={corda_lr}")
        methods.insert(2, own_lr(largest, "nlg-lr-largest"))
        for seed in SEEDS.split(","):
            yield compare(NLG, [task], methods, seed, f"forgetting-{task}") + FORGET_FLAGS

    def ablation(methods, tasks=(ABLATION_TASK,)):
        return Phase(
            # seed by seed, so an interrupted ablation leaves every configuration at the same seeds
            commands=lambda: (compare(NLG, [task], specs(methods, "nlg-lr"), seed, "nlg-main")
                              for seed in SEEDS.split(",") for task in tasks),
            folder="nlg-main", methods=lambda: specs(methods, "nlg-lr", strict=False), tasks=list(tasks))

    return {
        "nlu-lr": Phase(lambda: tuning(NLU, "mr", "nlu-lr"), "nlu-lr"),
        "nlu-main": Phase(lambda: main_table(NLU, NLU_TASKS, NLU_METHODS, "nlu-lr", "nlu-main", seed_major=True),
                          "nlu-main", methods=lambda: with_own_rates(
                              specs(NLU_METHODS, "nlu-lr", strict=False), [largest], "nlu-lr-largest")),
        # `largest` alone on the MiniLM grid, as nlg-lr-largest does on SmolLM2, and then on every NLU task and
        # seed at its own rate (when that differs from the shared one, which nlu-main already ran)
        "nlu-lr-largest": Phase(lambda: tuning(NLU, "mr", "nlu-lr-largest", families=((largest,),)),
                                "nlu-lr-largest"),
        "nlu-largest-own-lr": Phase(
            lambda: own_rate_runs(NLU, NLU_TASKS, [largest], "nlu-lr-largest", "nlu-lr", "nlu-main"),
            "nlu-main", table=False),
        "nlg-lr": Phase(lambda: tuning(NLG, ABLATION_TASK, "nlg-lr"), "nlg-lr"),
        # A check on the shared adapter rate: `largest` starts in W's principal output directions (like PiSSA),
        # where 2e-3 may be too large. Its own folder, so it never moves the family's tuned rate.
        "nlg-lr-largest": Phase(lambda: tuning(NLG, ABLATION_TASK, "nlg-lr-largest",
                                               families=(("astra:eigen_selection=largest",),)), "nlg-lr-largest"),
        # The runs that answer the eigen-selection question first (Astra's two ends and LoRA, every task, seed by
        # seed); nlg-main then adds the other methods to the same folder.
        "nlg-pairs": Phase(lambda: main_table(NLG, NLG_TASKS, NLG_PAIRS, "nlg-lr", "nlg-main", seed_major=True),
                           "nlg-main", table=False),
        # `largest` again at its own tuned rate (nlg-lr-largest), beside the shared-rate runs, every task and seed
        "nlg-largest-own-lr": Phase(
            lambda: own_rate_runs(NLG, NLG_TASKS, [largest], "nlg-lr-largest", "nlg-lr", "nlg-main"),
            "nlg-main", table=False),
        # PiSSA, CorDA and LoRA-GA tuned each on its own (OWN_FAMILY_NLG), same grid, dev, seed 0
        "nlg-lr-baselines": Phase(lambda: tuning(NLG, ABLATION_TASK, "nlg-lr-baselines",
                                                 families=tuple((m,) for m in OWN_FAMILY_NLG)), "nlg-lr-baselines"),
        "nlg-main": Phase(lambda: main_table(NLG, NLG_TASKS, NLG_METHODS, "nlg-lr", "nlg-main", seed_major=True,
                                             own=OWN_FAMILY_NLG),
                          "nlg-main", methods=lambda: with_own_rates(
                              specs(NLG_METHODS, "nlg-lr", strict=False, own=OWN_FAMILY_NLG), [largest],
                              "nlg-lr-largest")),
        "ablation-eigen": ablation(["astra", largest] + SELECTIONS),
        # Table 4 again with every selection at its own rate (`largest`'s from nlg-lr-largest, the others' tuned
        # here the same way), since a selection nearer the top of the spectrum may be penalised by the tail's rate
        "nlg-lr-selections": Phase(lambda: tuning(NLG, ABLATION_TASK, "nlg-lr-selections",
                                                  families=tuple((m,) for m in SELECTIONS)), "nlg-lr-selections"),
        "ablation-eigen-own-lr": Phase(
            lambda: own_rate_runs(NLG, [ABLATION_TASK], SELECTIONS, "nlg-lr-selections", "nlg-lr", "nlg-main"),
            "nlg-main", tasks=[ABLATION_TASK],
            methods=lambda: with_own_rates(with_own_rates(specs(["astra"], "nlg-lr"), [largest], "nlg-lr-largest"),
                                           SELECTIONS, "nlg-lr-selections")),
        # α = r keeps the NLG scaling α/r = 1 at every rank; LoRA at r = 128 is Figure 1's reference.
        "ablation-rank": ablation(["astra", largest, "lora"]
                                  + [f"{m}:rank={r}:alpha={r}" for r in (32, 128) for m in ("astra", largest)]
                                  + ["lora:rank=128:alpha=128"]),
        "nlg-lr-ranks": Phase(lambda: tuning(NLG, ABLATION_TASK, "nlg-lr-ranks",
                                             families=tuple((m,) for m in RANKED)), "nlg-lr-ranks"),
        "ablation-rank-own-lr": Phase(
            lambda: own_rate_runs(NLG, [ABLATION_TASK], RANKED, "nlg-lr-ranks", "nlg-lr", "nlg-main"),
            "nlg-main", tasks=[ABLATION_TASK],
            methods=lambda: with_own_rates(specs(["astra", "lora"], "nlg-lr"), RANKED, "nlg-lr-ranks")),
        "ablation-statistic": ablation([f"{m}{sep}statistic={s}" if s != "covariance" else m
                                        for m, sep in (("astra", ":"), (largest, ":"))
                                        for s in ("covariance", "second_moment", "max_normalized")]),
        # The statistic decides every initialisation, so it gets all three tasks (Astra's default ends; `largest`
        # at the shared rate diverges and says nothing about the statistic): 9 pairs instead of 3.
        "ablation-statistic-tasks": ablation([f"astra:statistic={s}" if s != "covariance" else "astra"
                                              for s in ("covariance", "second_moment", "max_normalized")],
                                             tasks=NLG_TASKS),
        # Issue 15 §3: ranks by effective rank under uniform r's parameter budget, at Astra's tuned rate, beside
        # uniform Astra (whose runs nlg-main already has, so they are skipped), all three tasks
        "ablation-allocation": ablation(["astra", "astra:rank_allocation=effective_rank"], tasks=NLG_TASKS),
        "ablation-null-space": ablation(["astra", "astra:null_space=exclude", largest,
                                         f"{largest}:null_space=exclude"]),
        "ablation-calibration": ablation(["astra", "astra:calibration_data=xsum", largest,
                                          f"{largest}:calibration_data=xsum"]),
        # Issue 15 §6, pre-registered in docs/results.md ("phase `variants`"): `largest`'s B = Q with A rescaled to
        # LoRA's initial size (S, factor_init=lora_scale) or with A = 0 and W untouched (D, factor_init=zero_a), at
        # the SHARED adapter rate, every task, seed by seed, beside LoRA, PiSSA and LoRA-GA at their tuned rates. A
        # phase writes one folder (unpacked before and packed after each command), so `variants` is two phases,
        # one per folder. Neither variant met the decision rule, so factor_init left the library (VARIANTS_RETIRED).
        **{f"variants-{kind}": Phase(
            lambda cfg=cfg, tasks=tasks, tune=tune, out=out: (
                compare(cfg, [task], specs(VARIANTS, tune),
                        seed, out) for seed in SEEDS.split(",") for task in tasks),
            out, tasks=tasks, methods=lambda tune=tune, own=own, own_tune=own_tune: with_own_rates(specs(
                VARIANTS + ["lora", "astra", largest, "pissa", "lora-ga"], tune, strict=False, own=own),
                [largest], own_tune), retired=VARIANTS_RETIRED)
           for kind, cfg, tasks, tune, out, own, own_tune in (
               ("nlu", NLU, NLU_TASKS, "nlu-lr", "nlu-main", (), "nlu-lr-largest"),
               ("nlg", NLG, NLG_TASKS, "nlg-lr", "nlg-main", OWN_FAMILY_NLG, "nlg-lr-largest"))},
        "effective-rank": Phase(effective_rank, "effective-rank"),
        # Issue 15 §5 (see EXTRA_SEEDS): seed by seed, every task, the same commands as the main tables' but the seed
        **{f"seeds5-{kind}": Phase(
            lambda cfg=cfg, tasks=tasks, tune=tune, own_tune=own_tune, kind=kind: (
                compare(cfg, [task], with_own_rates(specs(["astra", "lora"], tune), [largest], own_tune), seed,
                        f"seeds5-{kind}") for seed in EXTRA_SEEDS.split(",") for task in tasks),
            f"seeds5-{kind}", tasks=tasks, table=False)
           for kind, cfg, tasks, tune, own_tune in (("nlu", NLU, NLU_TASKS, "nlu-lr", "nlu-lr-largest"),
                                                    ("nlg", NLG, NLG_TASKS, "nlg-lr", "nlg-lr-largest"))},
        # Issue 15 §2 (see LONG): each method's rate re-tuned at 5x the steps, then every seed at that rate
        **{f"long-lr-{kind}": Phase(lambda kind=kind: tuning(LONG[kind][0], LONG[kind][1], f"long-lr-{kind}",
                                                            families=tuple((m,) for m in LONG_METHODS)),
                                    f"long-lr-{kind}")
           for kind in LONG},
        **{f"long-main-{kind}": Phase(lambda kind=kind: (
            compare(LONG[kind][0], [LONG[kind][1]], [own_lr(m, f"long-lr-{kind}") for m in LONG_METHODS], seed,
                    f"long-main-{kind}") for seed in SEEDS.split(",")), f"long-main-{kind}")
           for kind in LONG},
        # Issue 15 §2's other half: are strategyqa-yn and nli unlearned for want of budget? LoRA at the shared NLU
        # rate, 5x the steps, seed 0, test (about 5 and 20 min on one core)
        "long-unlearned": Phase(lambda: iter([compare(LONG["nlu"][0], ["strategyqa-yn", "nli"],
                                                      specs(["lora"], "nlu-lr"), "0", "long-unlearned")]),
                                "long-unlearned"),
        **{f"forgetting-{task}": Phase(lambda task=task: forgetting(task), f"forgetting-{task}")
           for task in FORGET_TASKS},
        # Issue 15 §6: both variants' forgetting (the rule asks it of D), on social-iqa; math-qa's was not run once
        # neither variant's held-out loss met the rule. The runs sit in the forgetting folder beside the others.
        "forgetting-variants-social-iqa": Phase(
            lambda: (compare(NLG, ["social-iqa"], specs(VARIANTS, "nlg-lr"), seed, "forgetting-social-iqa")
                     + FORGET_FLAGS for seed in SEEDS.split(",")), "forgetting-social-iqa", table=False,
            retired=VARIANTS_RETIRED),
    }


def command_lines(phase: Phase) -> Iterator[str]:
    """The phase's commands as shell lines; where one waits on a tuning phase that has not finished, a comment
    saying so ends the list."""
    if phase.retired:
        yield f"# retired: {phase.retired}"
    try:
        for cmd in phase.commands():
            yield " ".join(shlex.quote(c) for c in cmd)
    except SystemExit as why:
        yield f"# (then commands not yet runnable: {why})"


def _slugs(out: Path, task: str) -> list[str]:
    return pack_runs.run_folders(out.name, task)


def progress(phase: Phase) -> str:
    runs = phase_runs(phase)
    return f"{len(runs)} finished runs" + ("" if phase.methods is None else f" (in {phase.folder})")


def phase_methods(phase: Phase) -> Optional[list[str]]:
    """The spec names of the phase's table, in its order; None for a phase whose runs are all its own or whose
    tuning has not finished."""
    try:
        return phase.methods() if phase.methods is not None else None
    except SystemExit:
        return None


def phase_runs(phase: Phase) -> list[dict]:
    """The finished runs that make the phase's table (packed, or unpacked and newer)."""
    runs = pack_runs.collect_runs(phase.folder)
    if phase.tasks is not None:
        runs = [r for r in runs if r["task"] in phase.tasks]
    if phase.methods is not None:
        wanted = phase_methods(phase)
        runs = [r for r in runs if r["method"] in wanted] if wanted is not None else []
    return runs


def main(argv=None):
    global SEEDS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phases", nargs="*", help="phases to run, in order ('all' for every phase)")
    p.add_argument("--list", action="store_true", help="show phases and progress")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.add_argument("--seeds", default=SEEDS, help="seeds of the main tables and ablations (e.g. '0' to give "
                   "every configuration one seed before any gets three)")
    args = p.parse_args(argv)
    SEEDS = args.seeds
    os.chdir(ROOT)
    table = phases()
    if args.list or not args.phases:
        for name, phase in table.items():
            print(f"{name:22s} {progress(phase)}")
        return
    # 'all' passes over retired phases (their code is gone); naming one is refused below, saying why
    names = [n for n in table if not table[n].retired or args.dry_run] if args.phases == ["all"] else args.phases
    log = RUNS / "wall_times.csv"
    for name in names:
        if table[name].retired and not args.dry_run:
            raise SystemExit(f"phase {name} is retired: {table[name].retired}")
        if args.dry_run:  # goes on past a phase whose tuning is pending, to show the phases after it
            for line in command_lines(table[name]):
                print(line if line.startswith("#") else f"$ {line}")
            continue
        folder = table[name].folder
        written = pack_runs.unpack(folder)  # the finished runs, where `astra compare` looks for them
        if written:
            print(f"unpacked {written} files of {pack_runs.pack_path(folder).name} into {RUNS / folder}", flush=True)
        for cmd in table[name].commands():
            print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
            start = time.time()
            done = subprocess.run([sys.executable, *cmd[1:]])
            print(f"packed {pack_runs.pack(folder)} run folders into {pack_runs.pack_path(folder).name}", flush=True)
            RUNS.mkdir(parents=True, exist_ok=True)
            with open(log, "a", newline="") as f:
                csv.writer(f).writerow([name, round(time.time() - start, 1), done.returncode, time.strftime("%F %T")])
            if done.returncode:
                raise SystemExit(f"phase {name} failed (exit {done.returncode})")


if __name__ == "__main__":
    main()
