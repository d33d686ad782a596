"""Rank allocation from the activation spectrum: a PEFT `rank_pattern` under uniform rank's parameter budget.

The paper gives every layer the same rank r and names that as a limitation. Layers differ in how many
directions their outputs actually occupy; Eq. 9's effective rank measures it. `allocate_ranks` gives each
layer a rank proportional to its effective rank, under the same total number of adapter parameters as
rank r everywhere, Σ r_l·(d_in + d_out) ≤ r·Σ (d_in + d_out), and returns patterns for `LoraConfig`.

It runs on saved statistics and the plain base model, so it fits between `collect_activation_stats` and
`get_peft_model`:

    stats = collect_activation_stats(base, batches, lora_config)
    allocation = allocate_ranks(base, stats, lora_config)
    peft_model = get_peft_model(base, allocation.apply(lora_config))
    initialize_astra_weights(peft_model, stats=stats)
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .layers import full_weight, out_in_dims, target_base_layers
from .spectrum import effective_rank, eigenvalues
from .stats import ActivationStats


@dataclass
class RankAllocation:
    """Ranks per layer chosen by `allocate_ranks`, and the budget they were chosen under.

    Attributes:
        ranks: rank per target layer, keyed by the layer's name in the base model.
        effective_ranks: the effective rank (Eq. 9) of each layer's statistic that drove the choice.
        budget: adapter parameters allowed, r · Σ (d_in + d_out) for the uniform rank r.
        used: adapter parameters of `ranks`, Σ r_l · (d_in + d_out); never above `budget`.
        scaling: the LoRA scaling s = lora_alpha / r of the uniform config, kept for every layer by
            `alpha_pattern` (so a layer's B·A is scaled as under uniform rank, whatever its rank).
    """

    ranks: dict[str, int]
    effective_ranks: dict[str, float]
    budget: int
    used: int
    scaling: float
    alpha_pattern: dict[str, float] = field(init=False)

    def __post_init__(self):
        self.alpha_pattern = {name: self.scaling * r for name, r in self.ranks.items()}

    @property
    def rank_pattern(self) -> dict[str, int]:
        """`LoraConfig.rank_pattern`: PEFT reads each key as a regular expression, so the names are escaped."""
        return {re.escape(name): r for name, r in self.ranks.items()}

    def apply(self, lora_config):
        """A copy of `lora_config` with this allocation's `rank_pattern` and `alpha_pattern`.

        Args:
            lora_config: the `peft.LoraConfig` the statistics were collected for (uniform rank `r`).

        Returns:
            A new `LoraConfig`; `lora_config` itself is not changed.

        Raises:
            ValueError: if `lora_config` already has a rank or alpha pattern (the allocation would
                silently override it), or uses rsLoRA (its scaling α/√r is not kept by `alpha_pattern`).
        """
        _check_config(lora_config)
        new = copy.deepcopy(lora_config)
        new.rank_pattern = self.rank_pattern
        new.alpha_pattern = {re.escape(name): alpha for name, alpha in self.alpha_pattern.items()}
        return new


def allocate_ranks(
    model: nn.Module,
    stats: ActivationStats,
    lora_config,
    *,
    statistic: str = "covariance",
    min_rank: int = 1,
    max_rank: Optional[int] = None,
) -> RankAllocation:
    """Ranks proportional to each layer's effective rank, under uniform rank's parameter budget.

    Rank r_l = clamp(round(c · erank_l), min_rank, min(d_out, d_in, max_rank)) with the largest c whose
    parameter count fits the budget; the budget left over by rounding then goes, one rank at a time, to
    the layers whose rounded rank fell furthest below c · erank_l (ties: the cheaper layer, then the name),
    so the result is deterministic.

    Args:
        model: the plain base model the statistics were collected on (or a PeftModel of it, before
            initialisation); input-side statistics need its weights.
        stats: from `collect_activation_stats(model, ..., lora_config)`.
        lora_config: the uniform `LoraConfig` (`r`, `lora_alpha`, `target_modules`).
        statistic: the statistic whose spectrum is measured: "covariance" (Eq. 2, the default) or
            "second_moment"; "max_normalized" for statistics collected that way.
        min_rank: the smallest rank any layer gets.
        max_rank: the largest rank any layer gets (default: the layer's min(d_out, d_in)).

    Returns:
        A `RankAllocation`; `allocation.apply(lora_config)` is the config to pass to `get_peft_model`.

    Raises:
        ValueError: for a rank bound that is not positive, a budget that cannot give every layer
            `min_rank`, statistics that miss a target layer or were collected on other weights, or a
            `lora_config` with patterns or rsLoRA already set.
    """
    _check_config(lora_config)
    r = int(lora_config.r)
    if min_rank < 1 or (max_rank is not None and max_rank < min_rank):
        raise ValueError(f"allocate_ranks: need 1 ≤ min_rank ≤ max_rank, got min_rank={min_rank}, max_rank={max_rank}.")
    layers = target_base_layers(model, lora_config)
    if not layers:
        raise ValueError(f"allocate_ranks: no layer of the model matches target_modules={lora_config.target_modules!r}.")
    missing = sorted(set(layers) - set(stats.layers))
    if missing:
        raise ValueError(
            f"allocate_ranks: the statistics have no entry for {len(missing)} target layers (e.g. '{missing[0]}'); "
            "collect them with this LoraConfig."
        )
    cost, cap, erank = {}, {}, {}
    for name, layer in layers.items():
        d_out, d_in = out_in_dims(layer)
        if (stats.layers[name].d_out, stats.layers[name].d_in) != (d_out, d_in):
            raise ValueError(f"allocate_ranks: the statistics of layer '{name}' have another shape than the layer.")
        cost[name] = d_in + d_out
        cap[name] = min(d_out, d_in, max_rank or math.inf)
        if cap[name] < min_rank:
            raise ValueError(f"allocate_ranks: layer '{name}' ({d_out}×{d_in}) cannot take min_rank={min_rank}.")
        erank[name] = _layer_effective_rank(stats, name, layer, statistic)
    budget = r * sum(cost.values())
    if min_rank * sum(cost.values()) > budget:
        raise ValueError(f"allocate_ranks: min_rank={min_rank} exceeds the uniform rank r={r}'s budget.")
    ranks = _fill(erank, cost, cap, budget, min_rank)
    return RankAllocation(
        ranks=ranks,
        effective_ranks=erank,
        budget=budget,
        used=sum(ranks[n] * cost[n] for n in ranks),
        scaling=float(lora_config.lora_alpha) / r,
    )


def _check_config(lora_config) -> None:
    if getattr(lora_config, "rank_pattern", None) or getattr(lora_config, "alpha_pattern", None):
        raise ValueError("allocate_ranks: the LoraConfig already has a rank_pattern or alpha_pattern; pass the "
                         "uniform config.")
    if getattr(lora_config, "use_rslora", False):
        raise ValueError("allocate_ranks: use_rslora=True scales by α/√r, which alpha_pattern cannot keep constant "
                         "across ranks; use use_rslora=False.")


def _layer_effective_rank(stats: ActivationStats, name: str, layer: nn.Module, statistic: str) -> float:
    if not stats.factored(name):
        return effective_rank(eigenvalues(stats.output_statistic(name, statistic)))
    # F·G·Fᵀ's non-zero eigenvalues are those of R·G·Rᵀ (F = QR): p × p instead of d_out × d_out, and the
    # d_out − p structural zeros add nothing to the entropy.
    with full_weight(layer) as (w, bias):  # whole even where ZeRO-3 or FSDP2 shards it
        f, g = stats.output_factors(name, statistic, w, bias)
    r = torch.linalg.qr(f.to(torch.float64), mode="r").R
    small = r @ g @ r.T
    return effective_rank(eigenvalues(((small + small.T) / 2).cpu()))


def _fill(weight: dict[str, float], cost: dict[str, int], cap: dict[str, float], budget: int, floor: int) -> dict[str, int]:
    def ranks_at(c: float) -> dict[str, int]:
        return {n: int(min(max(round(c * w), floor), cap[n])) for n, w in weight.items()}

    def used(ranks: dict[str, int]) -> int:
        return sum(ranks[n] * cost[n] for n in ranks)

    lo, hi = 0.0, 1.0
    while used(ranks_at(hi)) <= budget and any(ranks_at(hi)[n] < cap[n] for n in weight):
        lo, hi = hi, hi * 2
    for _ in range(60):  # bisection on the scale c: used(c) is non-decreasing in c
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(ranks_at(mid)) <= budget else (lo, mid)
    ranks = ranks_at(lo)
    left = budget - used(ranks)
    # What rounding left over: one rank at a time to the layer furthest below its share.
    for name in sorted(weight, key=lambda n: (ranks[n] - lo * weight[n], cost[n], n)):
        if ranks[name] < cap[name] and cost[name] <= left:
            ranks[name] += 1
            left -= cost[name]
    return ranks
