"""One registry: method name → how to build the adapted model.

Every method PEFT implements is built with PEFT's own code (LoraConfig flags, or its data-driven preprocessors
for EVA, CorDA and LoRA-GA). Only MiLoRA, which PEFT lacks, and Astra, which calls this package's core, are ours.

A method is named on the command line by a *spec* (parsed in `specs.py`): ``METHOD[:KEY=VALUE]...``, e.g. ``astra``,
``astra:eigen_selection=largest``, ``dora:lr=2e-4``, ``corda:corda_method=kpm:calibration_samples=128``.
The spec string is also the run's name in tables and plots, so two variants of one method can sit side by side
in one comparison. Keys are either common to every method (``lr``, ``rank``, ``alpha``), about calibration data
(``calibration_samples``, ``calibration_data``; data-driven methods only), fields of the method's own config
(`AstraConfig`, `EvaConfig`, `CordaConfig`, `LoraGAConfig`), or the harness's own (Astra's ``rank_allocation``).
"""

from __future__ import annotations

import dataclasses
import enum
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..config import check_choices
from ..rewrite import subtract_adapters
from .kinds import DataNeed, TaskKind
from .rank_allocation import AstraRunOptions, build_allocated_astra

# Options every method accepts; they override the run's --lr/--rank/--alpha for this method only.
COMMON_OPTIONS: dict[str, type] = {"lr": float, "rank": int, "alpha": float}
# Options of methods that look at data before training.
CALIBRATION_OPTIONS: dict[str, type] = {"calibration_samples": int, "calibration_data": str}


@dataclass
class BuildContext:
    """What a method may use to build its model. Batches are produced lazily: only data-driven methods pay."""

    model: nn.Module
    task_kind: TaskKind
    target_modules: Any  # list[str] or a PEFT shorthand such as "all-linear"
    rank: int
    alpha: float
    seed: int = 0
    # Yields model inputs (input_ids, attention_mask) from the calibration data; a fresh iterator per call.
    calibration_batches: Optional[Callable[[], Iterable[dict]]] = None
    # Yields training batches with labels, for methods that need gradients (LoRA-GA).
    gradient_batches: Optional[Callable[[], Iterable[dict]]] = None
    cache_dir: Optional[Path] = None
    progress: bool = True  # the run's --no-progress turns the methods' own bars off too (Astra's calibration)

    def __post_init__(self):
        check_choices(self)


@dataclass
class BuiltModel:
    model: nn.Module
    # Wall time of looking at data (forward passes, statistics, gradients) and of writing the initial weights.
    calibration_seconds: float = 0.0
    init_seconds: float = 0.0
    # True when the method rewrote the base weights (W ← W − s·B₀A₀): then the trained adapter only fits the
    # residual model, and a plain-LoRA conversion for the original model is worth saving. `build_method` sets
    # it from the method's declared `BaseRebuild`; a build function does not.
    mutates_base: bool = False
    report: dict = field(default_factory=dict)


class BaseRebuild(enum.Enum):
    """What a method's initialisation does to the frozen base weights, declared once at registration.

    It says how to rebuild that base from the initial adapter saved in a run directory (resuming a run without
    calibrating again, `restore_initial_adapter`) and whether the trained adapter needs a plain-LoRA conversion
    to fit the original model. A rebuilt base must round exactly as the method's own did, or a resumed run
    drifts from an uninterrupted one: the value names the float32 order (`astra_peft.rewrite.residual_weight`).
    """

    KEEP = "keep"  # base untouched (LoRA, rsLoRA, DoRA, EVA, full): the saved adapter fits the original model
    PRODUCT = "product"  # W ← W − s·(B@A): Astra, PEFT's LoRA-GA
    SCALED_B = "scaled_b"  # W ← W − (s·B)@A: PEFT's PiSSA, OLoRA and CorDA, and our MiLoRA

    @property
    def rewrites_base(self) -> bool:
        return self is not BaseRebuild.KEEP

    def apply(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """Rebuild the base of `peft_model`, which holds the saved initial adapter on the ORIGINAL weights.

        Args:
            peft_model: The PeftModel just loaded with the initial adapter.
            adapter_name: The adapter whose B₀A₀ the method took out of the base.
        """
        if self.rewrites_base:
            subtract_adapters(peft_model, adapter_name, order=self.value)


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    build: Callable[[BuildContext, Any], BuiltModel]  # build(ctx, spec: specs.MethodSpec)
    config_cls: Optional[type] = None  # dataclass whose fields are this method's options
    # Dataclass of the harness's own options for this method, beside config_cls's (never passed to config_cls).
    run_options: Optional[type] = None
    data: Optional[DataNeed] = None  # None: the method looks at no data before training
    peft: bool = True  # False only for full fine-tuning
    base: BaseRebuild = BaseRebuild.KEEP
    # Where a spec option changes what the init does to the base (Astra's factor_init='zero_a' rewrites nothing):
    # spec -> BaseRebuild. None: `base` whatever the spec.
    base_for: Optional[Callable[[Any], BaseRebuild]] = None

    def __post_init__(self):
        check_choices(self)

    def rebuild(self, spec=None) -> BaseRebuild:
        """What this method's initialisation, configured by `spec` (a parsed `specs.MethodSpec`), does to the base.

        Args:
            spec: The parsed spec; None gives the method's declared `base`.

        Returns:
            The `BaseRebuild` that resuming from the initial adapter must apply.
        """
        return self.base_for(spec) if self.base_for is not None and spec is not None else self.base

    def option_types(self) -> dict[str, Any]:
        types: dict[str, Any] = dict(COMMON_OPTIONS) if self.peft else {"lr": float}
        if self.data:
            types.update(CALIBRATION_OPTIONS)
        if self.config_cls is not None:
            hints = typing.get_type_hints(self.config_cls)
            types.update({f.name: hints.get(f.name, str) for f in dataclasses.fields(self.config_cls)})
        if self.run_options is not None:
            hints = typing.get_type_hints(self.run_options)
            types.update({f.name: hints[f.name] for f in dataclasses.fields(self.run_options)})
        return types


METHODS: dict[str, Method] = {}


def register_method(name: str, help: str, *, config_cls: Optional[Callable[[], type]] = None,
                    data: Optional[DataNeed] = None, peft: bool = True, base: BaseRebuild = BaseRebuild.KEEP,
                    run_options: Optional[type] = None,
                    base_for: Optional[Callable[[Any], BaseRebuild]] = None):
    """Decorator: register `build(ctx, spec) -> BuiltModel` under `name`.

    Args:
        name: The method's name in specs (``NAME[:KEY=VALUE]...``).
        help: One line for `astra methods`.
        config_cls: A thunk returning the dataclass whose fields are the method's own spec options; a thunk so
            that optional dependencies (attrs for CorDA) are imported only when the method is used.
        data: What the method looks at before training, if anything (`kinds.DataNeed`).
        peft: False only for full fine-tuning (then the only common option is ``lr``).
        base: What the initialisation does to the frozen weights (see `BaseRebuild`). Declare it right, or a
            resumed run stops being exact: tests/test_persistence.py rebuilds every method from its saved
            initial adapter and compares the weights bit for bit.
        run_options: A dataclass whose fields are spec options the harness itself acts on (not fields of
            `config_cls`), e.g. Astra's ``rank_allocation``; its `__post_init__` validates them.
        base_for: `base_for(spec) -> BaseRebuild` where a spec option changes `base` (see `Method.rebuild`).

    Returns:
        The decorator, which returns `build` unchanged.
    """

    def wrap(build):
        cls = None
        if config_cls is not None:
            try:
                cls = config_cls()
            except ImportError:  # the method still builds (and fails with the real error) when chosen
                cls = None
        METHODS[name] = Method(name=name, help=help, build=build, config_cls=cls, data=data, peft=peft, base=base,
                               run_options=run_options, base_for=base_for)
        return build

    return wrap


def build_method(spec, ctx: BuildContext) -> BuiltModel:
    """Build the method `spec` names on `ctx.model`.

    Args:
        spec: A parsed `specs.MethodSpec`: its options are already coerced and validated.
        ctx: The model and what the method may use to initialise it.

    Returns:
        The adapted model, with wall times and the method's report; `mutates_base` from the method's `base`
        (as `spec` configures it: `Method.rebuild`).
    """
    method = METHODS[spec.method]
    built = method.build(ctx, spec)
    built.mutates_base = method.rebuild(spec).rewrites_base
    return built


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


def _astra_base(spec) -> BaseRebuild:
    # factor_init='zero_a' (issue 15 §6, experimental) starts A = 0 and rewrites nothing: its adapter fits the
    # original base, like LoRA's; every other factor_init takes s·B₀A₀ out of W in Astra's order.
    return BaseRebuild.KEEP if spec.method_config().factor_init == "zero_a" else BaseRebuild.PRODUCT


@register_method(
    "astra",
    "Astra: tail eigenvectors of the output-activation statistic (this package's core).",
    config_cls=_astra_config_cls,
    data="activations",
    base=BaseRebuild.PRODUCT,
    run_options=AstraRunOptions,
    base_for=_astra_base,
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


# ------------------------------------------------------------------------------------- PEFT data-driven


def _eva_config_cls():
    from peft import EvaConfig

    return EvaConfig


@register_method("eva", "EVA: SVD of layer inputs on data, rank redistribution (PEFT).", config_cls=_eva_config_cls,
                 data="activations")
def _build_eva(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights

    batches = list(_require_batches(ctx, "calibration_batches", "eva")())
    model, t_peft = _timed(get_peft_model, ctx.model, lora_config(ctx, init_lora_weights="eva",
                                                                   eva_config=spec.method_config()))
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
    base=BaseRebuild.SCALED_B,
)
def _build_corda(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.corda import preprocess_corda

    batches = _require_batches(ctx, "calibration_batches", "corda")
    config = lora_config(ctx, init_lora_weights="corda", corda_config=spec.method_config(corda_method="ipm"))

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
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_init)


def _loraga_config_cls():
    from peft.tuners.lora.config import LoraGAConfig

    return LoraGAConfig


@register_method(
    "lora-ga",
    "LoRA-GA: SVD of the full fine-tuning gradient estimated on data (PEFT).",
    config_cls=_loraga_config_cls,
    data="gradients",
    base=BaseRebuild.PRODUCT,
)
def _build_loraga(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    batches = _require_batches(ctx, "gradient_batches", "lora-ga")
    config = lora_config(ctx, init_lora_weights="lora_ga", lora_ga_config=spec.method_config())

    def train_step():
        for batch in batches():
            ctx.model(**batch).loss.backward()

    _, t_calib = _timed(preprocess_loraga, ctx.model, config, train_step)
    model, t_init = _timed(get_peft_model, ctx.model, config)
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_init)
