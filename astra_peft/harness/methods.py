"""One registry: method name → how to build the adapted model.

Every method PEFT implements is built with PEFT's own code (LoraConfig flags, or its data-driven preprocessors
for EVA, CorDA and LoRA-GA). Only MiLoRA, which PEFT lacks, and Astra, which calls this package's core, are ours.

A method is named on the command line by a *spec* (parsed in `specs.py`): ``METHOD[:KEY=VALUE]...``, e.g. ``astra``,
``astra:eigen_selection=largest``, ``dora:lr=2e-4``, ``corda:corda_method=kpm:calibration_samples=128``.
The spec string is also the run's name in tables and plots, so two variants of one method can sit side by side
in one comparison. Keys are either common to every method (``lr``, ``rank``, ``alpha``), about calibration data
(``calibration_samples``, ``calibration_data``; data-driven methods only), fields of the method's own config
(`AstraConfig`, `EvaConfig`, `CordaConfig`, `LoraGAConfig`), or the harness's own (Astra's ``rank_allocation``).

This module is the registry's front door: the machinery (`Method`, `register_method`, `build_method`, `BuildContext`,
`BuiltModel`, `BaseRebuild`, `lora_config`) lives in `method_registry.py` and is re-exported here; LoRA's family,
full fine-tuning, MiLoRA and Astra are registered below, and PEFT's data-driven baselines (EVA, CorDA, LoRA-GA) in
`baselines.py`, imported at the end of this module so that `METHODS` is complete, in its listing order, whenever
this module is.
"""

from __future__ import annotations

# Re-exported: callers import the registry from here (training, specs, restore, the tests, the study).
from .method_registry import (
    CALIBRATION_OPTIONS,
    COMMON_OPTIONS,
    METHODS,
    BaseRebuild,
    BuildContext,
    BuiltModel,
    Method,
    _require_batches,
    _timed,
    build_method,
    lora_config,
    register_method,
)
from .rank_allocation import AstraRunOptions, build_allocated_astra

__all__ = ["CALIBRATION_OPTIONS", "COMMON_OPTIONS", "METHODS", "BaseRebuild", "BuildContext", "BuiltModel", "Method",
           "build_method", "lora_config", "register_method"]


# ---------------------------------------------------------------------------------------- PEFT flag methods


def _plain(**flags):
    def build(ctx: BuildContext, spec) -> BuiltModel:
        from peft import get_peft_model

        model, seconds = _timed(get_peft_model, ctx.model, lora_config(ctx, **flags))
        return BuiltModel(model, init_seconds=seconds)

    return build


register_method("lora", "LoRA (Hu et al., 2022): Kaiming-uniform A, zero B.")(_plain())
register_method("rslora", "rsLoRA: LoRA with scaling α/√r.")(_plain(use_rslora=True))
register_method("dora", "DoRA: magnitude/direction-decomposed LoRA (PEFT's use_dora).")(_plain(use_dora=True))
register_method("pissa", "PiSSA: principal singular triplets of W, residual frozen (exact SVD).",
                base=BaseRebuild.SCALED_B)(_plain(init_lora_weights="pissa"))
register_method("olora", "OLoRA: QR decomposition of W, residual frozen.",
                base=BaseRebuild.SCALED_B)(_plain(init_lora_weights="olora"))


@register_method("full", "Full fine-tuning: every parameter trainable, no adapter.", peft=False)
def _build_full(ctx: BuildContext, spec) -> BuiltModel:
    for param in ctx.model.parameters():
        param.requires_grad_(True)
    return BuiltModel(ctx.model)


# ------------------------------------------------------------------------------------------------- MiLoRA


@register_method("milora", "MiLoRA: minor (smallest) singular triplets of W, residual frozen (ours; mirrors PiSSA).",
                 base=BaseRebuild.SCALED_B)
def _build_milora(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model

    model, t_peft = _timed(get_peft_model, ctx.model, lora_config(ctx))
    from .milora import milora_init

    _, t_init = _timed(milora_init, model)
    return BuiltModel(model, init_seconds=t_peft + t_init)


# --------------------------------------------------------------------------------------------------- Astra


def _astra_config_cls():
    from ..config import AstraConfig

    return AstraConfig


@register_method(
    "astra",
    "Astra: tail eigenvectors of the output-activation statistic (this package's core).",
    config_cls=_astra_config_cls,
    data="activations",
    base=BaseRebuild.PRODUCT,
    run_options=AstraRunOptions,
)
def _build_astra(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model

    from .. import initialize_astra_weights

    # The run's seed and progress setting unless the spec sets them.
    config = spec.method_config(seed=ctx.seed, show_progress=ctx.progress)
    batches = _require_batches(ctx, "calibration_batches", "astra")
    allocation = None
    try:
        if spec.run_options().rank_allocation == "effective_rank":
            model, report, allocation, t_peft = build_allocated_astra(ctx.model, lora_config(ctx), batches, config)
        else:
            model, t_peft = _timed(get_peft_model, ctx.model, lora_config(ctx))
            report = initialize_astra_weights(model, batches(), config)
    except ValueError as err:
        if "calibration tokens" not in str(err):
            raise
        # The library's advice ("more calibration samples or longer ones") names no flag; say which ones.
        raise ValueError(
            f"{err} From the command line: calibrate on more text with --calibration-data (a .txt or .jsonl file, "
            "or a built-in corpus such as xsum; see `astra tasks`) and --calibration-samples N, or on more training "
            "rows (--calibration-samples, up to the size of the train split); or use the largest eigenvectors, "
            "which need no minimum (--method astra:eigen_selection=largest)."
        ) from err
    details = {
        "summary": report.summary(),
        "degenerate_layers": report.degenerate_layers,
        "decomposition_seconds": report.decomposition_seconds,
        "write_seconds": report.write_seconds,
        **({"allocation": allocation} if allocation else {}),  # uniform runs' reports stay as they were
    }
    return BuiltModel(
        model,
        calibration_seconds=report.calibration_seconds,
        init_seconds=t_peft + report.decomposition_seconds + report.write_seconds,
        report=details,
    )


# Registered after Astra, as they always were: `astra methods`, `method_catalog.CATALOG` and "choose from" errors list
# the registry in this order. Imported last (and not by `method_registry`) so the import graph has no circle.
from . import baselines  # noqa: E402,F401
