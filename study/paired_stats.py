"""Paired statistics of the study tables (make_results.py, forgetting_results.py, seeds5_results.py,
variants_results.py): one implementation for all.

Differences are paired by task and seed (the same data order, the same evaluation rows); every interval is
reproducible byte for byte (a fixed bootstrap seed), so the tables regenerate identically.
"""

from __future__ import annotations

import math

import run_study

BOOTSTRAP = dict(resamples=10_000, seed=0)  # fixed, so the intervals regenerate byte for byte


def sign_test(wins: int, n: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven if either side were as likely to win."""
    extreme = max(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(extreme, n + 1)) / 2 ** n)


def paired_effect(diffs: list[float]) -> dict:
    """Mean of paired differences with its 95% t and bootstrap intervals and Cohen's d_z, as table cells ('–' where
    undefined: one pair, or differences without spread); with two pairs or more also "t_range", the t interval's
    (low, high)."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    n, mean = len(d), float(d.mean())
    out = {"mean": f"{mean:+.4f}", "t": "–", "boot": "–", "dz": "–"}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    out["t"] = f"[{mean - half:+.4f}, {mean + half:+.4f}]"
    out["t_range"] = (mean - half, mean + half)  # the same interval as numbers, for verdicts drawn from it
    idx = np.random.RandomState(BOOTSTRAP["seed"]).randint(0, n, size=(BOOTSTRAP["resamples"], n))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    out["boot"] = f"[{lo:+.4f}, {hi:+.4f}]"
    if sd > 0:
        out["dz"] = f"{mean / sd:+.2f}"
    return out


def finals(runs: list[dict], split: str) -> dict:
    """(method, task, seed) → that run's final metrics on `split`, for the runs that have them."""
    return {(r["method"], r["task"], r["seed"]): r["final"][split] for r in runs
            if r.get("final", {}).get(split, {}).get("accuracy") is not None}


def paired_with_default(runs: list[dict], split: str, order) -> str:
    """Astra's defaults against every other configuration of the table, on the (task, seed) cells both have:
    seeds share the data order, so a paired count says more than overlapping mean ± std."""
    final = finals(runs, split)
    methods = order or sorted({m for m, _, _ in final})
    default = next((m for m in methods if run_study.without_lr(m) == "astra"), None)
    if default is None:
        return ""
    rows = []
    for other in methods:
        cells = [(t, s) for m, t, s in final if m == default and (other, t, s) in final]
        if other == default or not cells:
            continue
        a = [final[(default, t, s)] for t, s in cells]
        b = [final[(other, t, s)] for t, s in cells]
        lower = sum(x["loss"] < y["loss"] for x, y in zip(a, b))
        higher = sum(x["accuracy"] > y["accuracy"] for x, y in zip(a, b))
        effect = paired_effect([y["loss"] - x["loss"] for x, y in zip(a, b)])
        rows.append(f"| {other} | {len(cells)} | {lower} | {sign_test(lower, len(cells)):.3f} | {effect['mean']} | "
                    f"{effect['t']} | {effect['boot']} | {effect['dz']} | {higher} |")
    if not rows:
        return ""
    return (f"`{default}` against each other configuration, paired by task and seed (cells both have): in how "
            "many pairs the default has the lower held-out loss (two-sided sign test p), the mean loss difference "
            "(other − default; positive: the default is better) with its 95% confidence intervals (paired t; paired "
            "bootstrap) and Cohen's d_z, and in how many pairs its accuracy is higher:\n\n"
            "| configuration | pairs | default lower loss | p | mean loss difference | 95% CI (paired t) | "
            "95% CI (paired bootstrap) | d_z | default higher acc. |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
