"""Paired statistics of the study tables (make_results.py, forgetting_results.py): one implementation for all.

Differences are paired by task and seed (the same data order, the same evaluation rows); every interval is
reproducible byte for byte (a fixed bootstrap seed), so the tables regenerate identically.
"""

from __future__ import annotations

import math

BOOTSTRAP = dict(resamples=10_000, seed=0)  # fixed, so the intervals regenerate byte for byte


def sign_test(wins: int, n: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven if either side were as likely to win."""
    extreme = max(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(extreme, n + 1)) / 2 ** n)


def paired_effect(diffs: list[float]) -> dict:
    """Mean of paired differences with its 95% t and bootstrap intervals and Cohen's d_z ('–' where undefined:
    one pair, or differences without spread)."""
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
    idx = np.random.RandomState(BOOTSTRAP["seed"]).randint(0, n, size=(BOOTSTRAP["resamples"], n))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    out["boot"] = f"[{lo:+.4f}, {hi:+.4f}]"
    if sd > 0:
        out["dz"] = f"{mean / sd:+.2f}"
    return out
