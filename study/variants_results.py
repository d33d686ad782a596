"""The decision section of issue 15 §6 in docs/results_tables.md: the two pre-registered variants against LoRA.

docs/results.md ("§6 Two variants, hypotheses written before any run") fixed the rule before the runs: a variant stays
in the library only if, over all 7 tasks × 3 seeds at the shared adapter rate, its held-out loss is below LoRA's on
average with the paired t 95% interval of the difference excluding 0, and (Variant D) its forgetting is not
significantly above LoRA's by the same test; the default changes only if a variant also beats `smallest` by the same
rule. This module applies that rule to the runs of phases variants-nlu and variants-nlg as they are, and says
"not decidable" while any of the 21 pairs is missing: it never decides on part of the evidence. The variants'
pre-registered predictions (S: no worse than `largest` at its own rate; D: below LoRA) get the same paired rows.
"""

from __future__ import annotations

from typing import Optional

import run_study
from paired_stats import paired_effect, sign_test

SPLIT = "test"
LARGEST = "astra:eigen_selection=largest"
VARIANTS = {"S (factor_init=lora_scale)": f"{LARGEST}:factor_init=lora_scale",
            "D (factor_init=zero_a)": f"{LARGEST}:factor_init=zero_a"}
PAIRS_NEEDED = 21  # 7 tasks × 3 seeds, fixed by the pre-registration


def _loss_cells(runs: list[dict]) -> dict:
    """(spec, task, seed) → held-out test loss, for the runs that have one."""
    return {(r["method"], r["task"], r["seed"]): r["final"][SPLIT]["loss"] for r in runs
            if r.get("final", {}).get(SPLIT, {}).get("loss") is not None}


def _spec(cells: dict, base: str, lr: Optional[str] = None, not_lr: Optional[str] = None) -> Optional[str]:
    """The one spec of `cells` whose options without the rate are `base` (at rate `lr`, or at any rate but `not_lr`)."""
    found = sorted({m for m, _, _ in cells if run_study.without_lr(m) == base
                    and (lr is None or f"lr={lr}" in m.split(":"))
                    and (not_lr is None or f"lr={not_lr}" not in m.split(":"))})
    return found[0] if len(found) == 1 else None


def _paired(cells: dict, a: str, b: str, tasks=None) -> tuple[int, int, dict]:
    pairs = sorted((t, s) for m, t, s in cells if m == a and (b, t, s) in cells and (tasks is None or t in tasks))
    diffs = [cells[(a, t, s)] - cells[(b, t, s)] for t, s in pairs]
    return len(pairs), sum(d < 0 for d in diffs), paired_effect(diffs) if diffs else {}


def _upper(effect: dict) -> Optional[float]:
    t = effect.get("t", "–")
    return None if t == "–" else float(t.strip("[]").split(",")[1])


def section(table: dict) -> str:
    parts = ["## Variants decision (issue 15 §6)\n"]
    kinds = {kind: run_study.phase_runs(table[f"variants-{kind}"]) for kind in ("nlu", "nlg")}
    refs = {}  # per kind: the shared-rate specs, read off LoRA's rate in that kind's runs
    cells = {}
    for kind, runs in kinds.items():
        mine = _loss_cells(runs)
        cells.update(mine)
        lora = _spec(mine, "lora")
        if lora is None:
            parts.append(f"`variants-{kind}`: no LoRA run yet.\n")
            continue
        rate = lora.split("lr=")[1]
        refs[kind] = {"LoRA": lora, "smallest (default)": _spec(mine, "astra", rate),
                      "largest, own rate": _spec(mine, LARGEST, not_lr=rate), "PiSSA": _spec(mine, "pissa"),
                      "LoRA-GA": _spec(mine, "lora-ga")}
        refs[kind].update({name: _spec(mine, base, rate) for name, base in VARIANTS.items()})
    if not refs:
        return "\n".join(parts + ["No runs yet.\n"])
    parts.append("Held-out test loss, variant − reference, paired by task and seed at each model's shared adapter "
                 "rate (a reference at its own tuned rate where it has one); negative: the variant is better. Rows per "
                 "model, then over every task of both models (the pre-registered pool of 7 tasks × 3 seeds).\n")
    lines = ["| variant | reference | pool | pairs | variant lower | p | mean difference | 95% CI (paired t) | "
             "95% CI (paired bootstrap) | d_z |", "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for vname in VARIANTS:
        for rname in ("LoRA", "smallest (default)", "largest, own rate", "PiSSA", "LoRA-GA"):
            pooled: dict = {}
            for kind, ref in refs.items():
                v, r = ref.get(vname), ref.get(rname)
                if v is None or r is None:
                    continue
                pooled.update({("V", t, s): x for (m, t, s), x in cells.items() if m == v})
                pooled.update({("R", t, s): x for (m, t, s), x in cells.items() if m == r})
                n, lower, eff = _paired(cells, v, r)
                if n:
                    lines.append(f"| {vname} | {rname} | {kind} | {n} | {lower} | {sign_test(lower, n):.3f} | "
                                 f"{eff['mean']} | {eff['t']} | {eff['boot']} | {eff['dz']} |")
            n, lower, eff = _paired(pooled, "V", "R")
            if n:
                lines.append(f"| {vname} | {rname} | all | {n} | {lower} | {sign_test(lower, n):.3f} | "
                             f"{eff['mean']} | {eff['t']} | {eff['boot']} | {eff['dz']} |")
            if rname in ("LoRA", "smallest (default)"):
                upper = _upper(eff) if n else None
                if n < PAIRS_NEEDED:
                    what = f"not decidable yet ({n} of {PAIRS_NEEDED} pairs)"
                else:
                    what = ("below, interval excluding 0" if upper is not None and upper < 0 else
                            "not below with the interval excluding 0")
                verdicts.append((vname, rname, what))
    parts.append("\n".join(lines) + "\n")
    parts.append("The pre-registered rule applied to the held-out loss (forgetting, for D, is in the forgetting "
                 "section when its runs exist):\n\n" + "\n".join(f"- {v} against {r}: {w}" for v, r, w in verdicts)
                 + "\n")
    return "\n".join(parts)
