"""What `astra methods` lists — each method's name, one-line help and spec options — without importing torch or PEFT.

The method registry (`method_registry.py`, filled by `methods.py` and `baselines.py`) is the source of truth, but
building it imports torch and reading PEFT's config classes (EvaConfig, CordaConfig, LoraGAConfig) imports PEFT:
15 s or more on a busy machine, for a listing.
So the listing is written out here, and `tests/test_cli_startup.py` fails if it differs in any way from the
registry (names, order, help, data, options), so the two cannot drift apart silently. Astra's options are read
from `AstraConfig` itself, which is light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .kinds import DataNeed

COMMON = ("alpha", "lr", "rank")  # methods.COMMON_OPTIONS
CALIBRATION = ("calibration_data", "calibration_samples")  # methods.CALIBRATION_OPTIONS


@dataclass(frozen=True)
class MethodInfo:
    name: str
    help: str
    data: Optional[DataNeed] = None  # as Method.data
    peft: bool = True
    # fields of the method's own config class ("astra": read from AstraConfig) and of its run options
    config_options: tuple = ()

    def options(self) -> list[str]:
        """Every KEY a spec `METHOD:KEY=VALUE` accepts, sorted: as `methods.Method.option_types()`."""
        names = set(COMMON) if self.peft else {"lr"}
        if self.data:
            names.update(CALIBRATION)
        if self.name == "astra":
            from ..config import AstraConfig  # plain dataclass, no torch

            names.update(f.name for f in dataclasses.fields(AstraConfig))
        names.update(self.config_options)
        return sorted(names)


CATALOG: tuple[MethodInfo, ...] = (
    MethodInfo("lora", "LoRA (Hu et al., 2022): Kaiming-uniform A, zero B."),
    MethodInfo("rslora", "rsLoRA: LoRA with scaling α/√r."),
    MethodInfo("dora", "DoRA: magnitude/direction-decomposed LoRA (PEFT's use_dora)."),
    MethodInfo("pissa", "PiSSA: principal singular triplets of W, residual frozen (exact SVD)."),
    MethodInfo("olora", "OLoRA: QR decomposition of W, residual frozen."),
    MethodInfo("full", "Full fine-tuning: every parameter trainable, no adapter.", peft=False),
    MethodInfo("milora", "MiLoRA: minor (smallest) singular triplets of W, residual frozen (ours; mirrors PiSSA)."),
    MethodInfo("astra", "Astra: tail eigenvectors of the output-activation statistic (this package's core).",
               data="activations", config_options=("rank_allocation",)),  # rank_allocation.AstraRunOptions
    MethodInfo("eva", "EVA: SVD of layer inputs on data, rank redistribution (PEFT).", data="activations",
               config_options=("adjust_scaling_factors", "label_mask_value", "rho", "tau", "use_label_mask",
                               "whiten")),
    MethodInfo("corda", "CorDA: context-oriented SVD of W·C (corda_method=ipm, default, or kpm) on data (PEFT).",
               data="activations",
               config_options=("cache_file", "corda_method", "covariance_file", "prune_temporary_fields",
                               "use_float16_for_covariance", "verbose")),
    MethodInfo("lora-ga", "LoRA-GA: SVD of the full fine-tuning gradient estimated on data (PEFT).",
               data="gradients", config_options=("direction", "scale", "stable_gamma")),
)
