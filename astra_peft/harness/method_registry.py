"""The method registry itself: `Method`, `register_method`, `build_method` and what a build function takes and returns.

Only the machinery lives here; the methods are registered by `methods.py` (LoRA's family, full fine-tuning, MiLoRA,
Astra) and `baselines.py` (PEFT's data-driven initialisations), and `methods.py` imports `baselines.py` at its end.
So read the registry through `methods` (``from astra_peft.harness.methods import METHODS``): a module that imports
only this one sees no method at all.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from torch import nn

from ..config import check_choices
from ..rewrite import subtract_adapters
from .kinds import DataNeed, TaskKind

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

    def __post_init__(self):
        check_choices(self)

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
                    run_options: Optional[type] = None):
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
                               run_options=run_options)
        return build

    return wrap


def build_method(spec, ctx: BuildContext) -> BuiltModel:
    """Build the method `spec` names on `ctx.model`.

    Args:
        spec: A parsed `specs.MethodSpec`: its options are already coerced and validated.
        ctx: The model and what the method may use to initialise it.

    Returns:
        The adapted model, with wall times and the method's report; `mutates_base` from the method's `base`.
    """
    method = METHODS[spec.method]
    built = method.build(ctx, spec)
    built.mutates_base = method.base.rewrites_base
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
