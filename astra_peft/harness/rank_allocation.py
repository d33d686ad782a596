"""Astra with ranks allocated by effective rank, as a harness option: ``astra:rank_allocation=effective_rank``.

The library's `astra_peft.allocate_ranks` picks each layer's rank from its statistic's effective rank under
uniform rank r's parameter budget. Here the harness calibrates the plain base model once, allocates, builds the
PeftModel with the allocation's `rank_pattern`/`alpha_pattern`, and initialises Astra from the same statistics,
so the outputs at init are unchanged as with uniform rank.

Resuming needs nothing more: the initial adapter the run directory saves carries both patterns in its
adapter_config.json, and the spec (with this option) is part of the fingerprint that decides whether a saved
initial adapter is reused. `check_restored_ranks` still holds a restored model to the ranks the run recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from ..config import check_choices
from .kinds import RankAllocationKind


@dataclass
class AstraRunOptions:
    """Astra's spec options that the harness acts on (AstraConfig's fields are the others).

    Attributes:
        rank_allocation: "uniform" (rank r in every layer, the paper) or "effective_rank" (ranks proportional to
            each layer's effective rank, under uniform r's parameter budget: `astra_peft.allocate_ranks`).
    """

    rank_allocation: RankAllocationKind = "uniform"

    def __post_init__(self):
        check_choices(self)


def build_allocated_astra(model: nn.Module, uniform_config, batches: Callable[[], Iterable[dict]], astra_config):
    """Calibrate `model`, allocate ranks under `uniform_config`'s budget, build the PeftModel and initialise Astra.

    Args:
        model: The plain base model (untouched until the statistics and the allocation exist).
        uniform_config: The run's `LoraConfig` with uniform rank r (no patterns): it sets the budget.
        batches: Returns a fresh iterator of calibration batches.
        astra_config: The run's `AstraConfig` (its `statistic` is also the spectrum the allocation measures).

    Returns:
        (peft_model, AstraReport, allocation report dict, seconds of allocating and building the PeftModel).

    Raises:
        ValueError: From calibration, allocation or initialisation (e.g. too few calibration tokens), or when
            PEFT built other layers or ranks than allocated.
    """
    from peft import get_peft_model

    from .. import allocate_ranks, collect_activation_stats, initialize_astra_weights

    stats = collect_activation_stats(model, batches(), uniform_config, astra_config)
    start = time.perf_counter()
    allocation = allocate_ranks(model, stats, uniform_config, statistic=astra_config.statistic)
    peft_model = get_peft_model(model, allocation.apply(uniform_config))
    seconds = time.perf_counter() - start
    check_restored_ranks(peft_model, allocation.ranks, "the PeftModel built from the allocation")
    report = initialize_astra_weights(peft_model, astra_config=astra_config, stats=stats)
    report.calibration_seconds = stats.seconds or 0.0  # calibrated here, not inside initialize_astra_weights
    return peft_model, report, allocation_report(allocation), seconds


def allocation_report(allocation) -> dict[str, Any]:
    """What the run's summary records of a `RankAllocation`: each layer's rank and the budget it fits in."""
    ranks = allocation.ranks
    return {
        "rank_allocation": "effective_rank",
        "ranks": dict(ranks),
        "effective_ranks": {name: round(float(v), 4) for name, v in allocation.effective_ranks.items()},
        "rank_min": min(ranks.values()),
        "rank_max": max(ranks.values()),
        "adapter_parameters": allocation.used,  # Σ r_l·(d_in + d_out): LoRA A and B, no head
        "uniform_budget": allocation.budget,  # r·Σ (d_in + d_out)
    }


def check_restored_ranks(peft_model: nn.Module, ranks: dict[str, int], what: str) -> None:
    """Refuse a PeftModel whose LoRA layers or ranks differ from `ranks` (layer name → rank).

    Args:
        peft_model: The model built or restored.
        ranks: The allocated ranks, keyed by the layer's name in the base model.
        what: Names the model in the error (e.g. the folder it was restored from).

    Raises:
        ValueError: A layer is missing, extra, or has another rank; the message names the first one.
    """
    from ..layers import lora_layers

    built = {name: layer.r["default"] for name, layer in lora_layers(peft_model, "default").items()}
    if built == ranks:
        return
    for name in sorted(set(built) | set(ranks)):
        if built.get(name) != ranks.get(name):
            raise ValueError(
                f"{what}: layer '{name}' has LoRA rank {built.get(name)} but the rank allocation gave it "
                f"{ranks.get(name)}; the run cannot continue with other ranks than it allocated. Start the run "
                "again (--force) to calibrate and allocate anew."
            )
