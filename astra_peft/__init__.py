"""Astra: Activation-Space Tail-Eigenvector Low-Rank Adaptation, on top of Hugging Face PEFT.

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=[...]))
    initialize_astra_weights(peft_model, calibration_dataloader, AstraConfig())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public names are loaded on first use (PEP 562), not at `import astra_peft`: the package's modules import
# torch and PEFT (seconds to tens of seconds on a busy machine), and the `astra` CLI, which lives under
# astra_peft.harness and so imports this file first, must answer `--help` without paying for them.
_EXPORTS = {
    "RankAllocation": "allocation",
    "allocate_ranks": "allocation",
    "AstraConfig": "config",
    "AstraReport": "initialization",
    "ActivationStats": "stats",
    "collect_activation_stats": "calibration",
    "calibration_batches": "data",
    "effective_rank": "spectrum",
    "effective_ranks": "analysis",
    "initialize_astra_weights": "initialization",
    "save_as_lora": "conversion",
    "load_residual_adapter": "conversion",
    "quantize_astra_model": "quantized",
    "initialize_astra_on_quantized": "quantized",
    "initialize_astra_for_trainer": "integrations",
    "AstraTrainerCallback": "integrations",
    "restore_astra_initialization": "integrations",
}

__all__ = [
    "RankAllocation",
    "allocate_ranks",
    "AstraConfig",
    "AstraReport",
    "ActivationStats",
    "collect_activation_stats",
    "calibration_batches",
    "effective_rank",
    "effective_ranks",
    "initialize_astra_weights",
    "save_as_lora",
    "load_residual_adapter",
    "quantize_astra_model",
    "initialize_astra_on_quantized",
    "initialize_astra_for_trainer",
    "AstraTrainerCallback",
    "restore_astra_initialization",
]
__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .allocation import RankAllocation, allocate_ranks
    from .calibration import collect_activation_stats
    from .config import AstraConfig
    from .conversion import load_residual_adapter, save_as_lora
    from .data import calibration_batches
    from .initialization import AstraReport, initialize_astra_weights
    from .integrations import AstraTrainerCallback, initialize_astra_for_trainer, restore_astra_initialization
    from .quantized import initialize_astra_on_quantized, quantize_astra_model
    from .analysis import effective_ranks
    from .spectrum import effective_rank
    from .stats import ActivationStats


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
