"""One registry: method name → how to build the adapted model.

Every method PEFT implements is built with PEFT's own code (LoraConfig flags, or its data-driven preprocessors
for EVA, CorDA and LoRA-GA). Only MiLoRA, which PEFT lacks, and Astra, which calls this package's core, are ours.

A method is named on the command line by a *spec* (parsed in `specs.py`): ``METHOD[:KEY=VALUE]...``, e.g. ``astra``,
``astra:eigen_selection=largest``, ``dora:lr=2e-4``, ``corda:corda_method=kpm:calibration_samples=128``.
The spec string is also the run's name in tables and plots, so two variants of one method can sit side by side
in one comparison. Keys are either common to every method (``lr``, ``rank``, ``alpha``), about calibration data
(``calibration_samples``, ``calibration_data``; data-driven methods only), or fields of the method's own config
(`AstraConfig`, `EvaConfig`, `CordaConfig`, `LoraGAConfig`).
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..layers import lora_layers

# Options every method accepts; they override the run's --lr/--rank/--alpha for this method only.
COMMON_OPTIONS: dict[str, type] = {"lr": float, "rank": int, "alpha": float}
# Options of methods that look at data before training.
CALIBRATION_OPTIONS: dict[str, type] = {"calibration_samples": int, "calibration_data": str}


@dataclass
class BuildContext:
    """What a method may use to build its model. Batches are produced lazily: only data-driven methods pay."""

    model: nn.Module
    task_kind: str  # "classification" | "generation"
    target_modules: Any  # list[str] or a PEFT shorthand such as "all-linear"
    rank: int
    alpha: float
    seed: int = 0
    # Yields model inputs (input_ids, attention_mask) from the calibration data; a fresh iterator per call.
    calibration_batches: Optional[Callable[[], Iterable[dict]]] = None
    # Yields training batches with labels, for methods that need gradients (LoRA-GA).
    gradient_batches: Optional[Callable[[], Iterable[dict]]] = None
    cache_dir: Optional[Path] = None


@dataclass
class BuiltModel:
    model: nn.Module
    # Wall time of looking at data (forward passes, statistics, gradients) and of writing the initial weights.
    calibration_seconds: float = 0.0
    init_seconds: float = 0.0
    # True when the method rewrote the base weights (W ← W − s·B₀A₀): then the trained adapter only fits the
    # residual model, and a plain-LoRA conversion for the original model is worth saving.
    mutates_base: bool = False
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    build: Callable[[BuildContext, dict], BuiltModel]
    config_cls: Optional[type] = None  # dataclass whose fields are this method's options
    data: Optional[str] = None  # None | "activations" | "gradients"
    peft: bool = True  # False only for full fine-tuning
    # How the method forms the residual base in float32, W − (s·B)@A or W − s·(B@A): rebuilding it from a saved
    # initial adapter the same way reproduces the original run bit for bit.
    residual: str = "scaled_b"

    def option_types(self) -> dict[str, Any]:
        types: dict[str, Any] = dict(COMMON_OPTIONS) if self.peft else {"lr": float}
        if self.data:
            types.update(CALIBRATION_OPTIONS)
        if self.config_cls is not None:
            hints = typing.get_type_hints(self.config_cls)
            types.update({f.name: hints.get(f.name, str) for f in dataclasses.fields(self.config_cls)})
        return types


METHODS: dict[str, Method] = {}


def register_method(name: str, help: str, *, config_cls: Optional[Callable[[], type]] = None, data=None, peft=True,
                    residual="scaled_b"):
    """Decorator: register `build(ctx, options) -> BuiltModel` under `name`. `config_cls` is a thunk so that
    optional dependencies (attrs for CorDA) are imported only when the method is used."""

    def wrap(build):
        cls = None
        if config_cls is not None:
            try:
                cls = config_cls()
            except ImportError:  # the method still builds (and fails with the real error) when chosen
                cls = None
        METHODS[name] = Method(name=name, help=help, build=build, config_cls=cls, data=data, peft=peft,
                               residual=residual)
        return build

    return wrap


def build_method(spec, ctx: BuildContext) -> BuiltModel:
    """Build `spec` (a `specs.MethodSpec`) on `ctx.model`."""
    return METHODS[spec.method].build(ctx, dict(spec.options))


# ------------------------------------------------------------------------------------------------ helpers


def lora_config(ctx: BuildContext, **kwargs):
    from peft import LoraConfig, TaskType

    task_type = TaskType.SEQ_CLS if ctx.task_kind == "classification" else TaskType.CAUSAL_LM
    # lora_dropout 0 as in the paper's Tables 7/8, and it keeps CPU runs bit-for-bit deterministic.
    return LoraConfig(
        r=ctx.rank,
        lora_alpha=ctx.alpha,
        target_modules=ctx.target_modules,
        lora_dropout=0.0,
        task_type=task_type,
        **kwargs,
    )


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _require_batches(ctx: BuildContext, which: str, method: str):
    batches = getattr(ctx, which)
    if batches is None:
        raise ValueError(f"method {method!r} needs data to initialise, but no {which.replace('_', ' ')} were given")
    return batches


# ---------------------------------------------------------------------------------------- PEFT flag methods


def _plain(**flags):
    def build(ctx: BuildContext, options: dict) -> BuiltModel:
        from peft import get_peft_model

        model, seconds = _timed(get_peft_model, ctx.model, lora_config(ctx, **flags))
        mutates = flags.get("init_lora_weights") in ("pissa", "olora")
        return BuiltModel(model, init_seconds=seconds, mutates_base=mutates)

    return build


register_method("lora", "LoRA (Hu et al., 2022): Kaiming-uniform A, zero B.")(_plain())
register_method("rslora", "rsLoRA: LoRA with scaling α/√r.")(_plain(use_rslora=True))
register_method("dora", "DoRA: magnitude/direction-decomposed LoRA (PEFT's use_dora).")(_plain(use_dora=True))
register_method("pissa", "PiSSA: principal singular triplets of W, residual frozen (exact SVD).")(
    _plain(init_lora_weights="pissa")
)
register_method("olora", "OLoRA: QR decomposition of W, residual frozen.")(_plain(init_lora_weights="olora"))


@register_method("full", "Full fine-tuning: every parameter trainable, no adapter.", peft=False)
def _build_full(ctx: BuildContext, options: dict) -> BuiltModel:
    for param in ctx.model.parameters():
        param.requires_grad_(True)
    return BuiltModel(ctx.model)


# ------------------------------------------------------------------------------------------------- MiLoRA


@register_method("milora", "MiLoRA: minor (smallest) singular triplets of W, residual frozen (ours; mirrors PiSSA).")
def _build_milora(ctx: BuildContext, options: dict) -> BuiltModel:
    from peft import get_peft_model

    model, t_peft = _timed(get_peft_model, ctx.model, lora_config(ctx))
    from .milora import milora_init

    _, t_init = _timed(milora_init, model)
    return BuiltModel(model, init_seconds=t_peft + t_init, mutates_base=True)


# --------------------------------------------------------------------------------------------------- Astra


def _astra_config_cls():
    from ..config import AstraConfig

    return AstraConfig


@register_method(
    "astra",
    "Astra: tail eigenvectors of the output-activation statistic (this package's core).",
    config_cls=_astra_config_cls,
    data="activations",
    residual="product",
)
def _build_astra(ctx: BuildContext, options: dict) -> BuiltModel:
    from peft import get_peft_model

    from .. import AstraConfig, initialize_astra_weights

    options.setdefault("seed", ctx.seed)
    config = AstraConfig(**options)
    batches = _require_batches(ctx, "calibration_batches", "astra")
    model, t_peft = _timed(get_peft_model, ctx.model, lora_config(ctx))
    report = initialize_astra_weights(model, batches(), config)
    details = {
        "summary": report.summary(),
        "degenerate_layers": report.degenerate_layers,
        "decomposition_seconds": report.decomposition_seconds,
        "write_seconds": report.write_seconds,
    }
    return BuiltModel(
        model,
        calibration_seconds=report.calibration_seconds,
        init_seconds=t_peft + report.decomposition_seconds + report.write_seconds,
        mutates_base=True,
        report=details,
    )


# ------------------------------------------------------------------------------------- PEFT data-driven


def _eva_config_cls():
    from peft import EvaConfig

    return EvaConfig


@register_method("eva", "EVA: SVD of layer inputs on data, rank redistribution (PEFT).", config_cls=_eva_config_cls,
                 data="activations")
def _build_eva(ctx: BuildContext, options: dict) -> BuiltModel:
    from peft import EvaConfig, get_peft_model
    from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights

    batches = list(_require_batches(ctx, "calibration_batches", "eva")())
    model, t_peft = _timed(get_peft_model, ctx.model, lora_config(ctx, init_lora_weights="eva",
                                                                   eva_config=EvaConfig(**options)))
    state, t_calib = _timed(get_eva_state_dict, model, dataloader=batches)
    _, t_init = _timed(initialize_lora_eva_weights, model, eva_state_dict=state)
    ranks = {k: int(v.shape[0]) for k, v in state.items()}
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_peft + t_init, report={"ranks": ranks})


def _corda_config_cls():
    from peft.tuners.lora.config import CordaConfig

    return CordaConfig


@register_method(
    "corda",
    "CorDA: context-oriented SVD of W·C (corda_method=ipm, default, or kpm) on data (PEFT).",
    config_cls=_corda_config_cls,
    data="activations",
)
def _build_corda(ctx: BuildContext, options: dict) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    options.setdefault("corda_method", "ipm")
    batches = _require_batches(ctx, "calibration_batches", "corda")
    config = lora_config(ctx, init_lora_weights="corda", corda_config=CordaConfig(**options))

    @torch.no_grad()
    def run_model():
        # PEFT's CorDA hook takes one unpadded sequence per forward (it squeezes the batch dimension).
        for batch in batches():
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                ctx.model(input_ids=ids[mask.bool()][None])

    was_training = ctx.model.training
    ctx.model.eval()
    _, t_calib = _timed(preprocess_corda, ctx.model, config, run_model=run_model)
    ctx.model.train(was_training)
    model, t_init = _timed(get_peft_model, ctx.model, config)
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_init, mutates_base=True)


def _loraga_config_cls():
    from peft.tuners.lora.config import LoraGAConfig

    return LoraGAConfig


@register_method(
    "lora-ga",
    "LoRA-GA: SVD of the full fine-tuning gradient estimated on data (PEFT).",
    config_cls=_loraga_config_cls,
    data="gradients",
    residual="product",
)
def _build_loraga(ctx: BuildContext, options: dict) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    batches = _require_batches(ctx, "gradient_batches", "lora-ga")
    config = lora_config(ctx, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(**options))

    def train_step():
        for batch in batches():
            ctx.model(**batch).loss.backward()

    _, t_calib = _timed(preprocess_loraga, ctx.model, config, train_step)
    model, t_init = _timed(get_peft_model, ctx.model, config)
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_init, mutates_base=True)


# ------------------------------------------------------------------------------------ restoring an init


@torch.no_grad()
def restore_initial_adapter(model: nn.Module, adapter_dir, method: str, mutates_base: bool):
    """Rebuild what `build_method` made from its saved initial adapter, without calibrating again: a plain
    PeftModel with the saved weights and, for methods that rewrote the base, W ← W − s·B₀A₀ formed as the
    method forms it. This is what makes resuming an Astra run cheap."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils.other import transpose
    from peft.utils.save_and_load import load_peft_weights

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    config.init_lora_weights = True  # the weights come from the file, not from running the init again
    for sub in ("eva_config", "corda_config", "lora_ga_config"):
        if getattr(config, sub, None) is not None:
            setattr(config, sub, None)
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir), device="cpu"))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir} does not fit this model: unexpected keys {result.unexpected_keys[:3]}")
    if mutates_base:
        product = METHODS[method].residual == "product"
        for layer in lora_layers(peft_model, "default").values():
            base = layer.get_base_layer()
            s = layer.scaling["default"]
            b, a = layer.lora_B["default"].weight.float(), layer.lora_A["default"].weight.float()
            delta = s * (b @ a) if product else s * b @ a
            weight = transpose(base.weight.to(torch.float32), layer.fan_in_fan_out) - delta
            base.weight.data = transpose(weight.to(base.weight.dtype), layer.fan_in_fan_out)
    return peft_model
