"""Values read out of collected run summaries, for the tables (report.py) and the figures (plots.py)."""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the values present (None and NaN skipped; 0 for one value, NaN for
    none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ordered(items: Sequence[str], order: Optional[Sequence[str]]) -> list[str]:
    """The distinct `items`: those named in `order` first, in its order, then the rest sorted."""
    order = list(order or [])
    return [m for m in order if m in items] + sorted(m for m in set(items) if m not in order)


def final_metric(run: dict, split: str, metric: str = "accuracy") -> Optional[float]:
    """A run's final `metric` on `split`, or None where the run has none."""
    return run.get("final", {}).get(split, {}).get(metric)
