"""`AstraConfig`: every choice the paper leaves open, made explicit.

Each choice list is written once, here, as a `Literal` alias. Everything else derives from it: the field
annotations, the validation (`check_choices`), the spec parser's coercion of ``astra:KEY=VALUE`` and the CLI's
`choices=` and help text (through the ``*_CHOICES`` tuples, `typing.get_args` of the alias).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

# ---- the choice lists (one line each; see the AstraConfig field of the same name for what each value means)
EigenSelection = Literal["smallest", "largest", "middle", "lower_quartile", "upper_quartile", "random"]
Statistic = Literal["covariance", "second_moment", "max_normalized"]
NullSpacePolicy = Literal["keep", "exclude", "raise"]
StatisticSource = Literal["auto", "input", "output"]
AccumulationDtype = Literal["float32", "float64"]
StatsDevice = Literal["model", "cpu"]
# Where one layer's statistic was accumulated: an input Gram shared by the layers reading that input, the
# layer's own output Gram, the authors' per-sequence max-normalised output Gram, or that statistic kept as the
# layer's own input Gram with each sequence weighted by 1/m_s² (cheaper where d_in + 1 < d_out).
AccumulatorKind = Literal["input", "output", "max_normalized", "max_normalized_input"]
# Which statistics a calibration can serve: "moments" (covariance and second_moment) or "max_normalized".
StatsFamily = Literal["moments", "max_normalized"]
# How a residual base W − s·B·A is rounded in float32 (see astra_peft/rewrite.py): "product" forms s·(B@A),
# as Astra and PEFT's LoRA-GA do; "scaled_b" forms (s·B)@A, as PEFT's PiSSA/OLoRA/CorDA and our MiLoRA do.
ResidualOrder = Literal["product", "scaled_b"]

EIGEN_SELECTIONS: tuple[str, ...] = typing.get_args(EigenSelection)
STATISTICS: tuple[str, ...] = typing.get_args(Statistic)
NULL_SPACE_POLICIES: tuple[str, ...] = typing.get_args(NullSpacePolicy)
STATISTIC_SOURCES: tuple[str, ...] = typing.get_args(StatisticSource)
ACCUMULATOR_KINDS: tuple[str, ...] = typing.get_args(AccumulatorKind)


def literal_choices(hint) -> Optional[tuple]:
    """The allowed values of a `Literal[...]` annotation (also inside `Optional[...]`), else None.

    Args:
        hint: A resolved type annotation, e.g. ``EigenSelection`` or ``Optional[StatsDevice]``.

    Returns:
        The tuple of allowed values, or None when `hint` is not a Literal.
    """
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):  # Optional[Literal[...]], Union[..., Literal[...]]
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


@functools.lru_cache(maxsize=None)
def _literal_fields(cls: type) -> tuple[tuple[str, tuple, bool], ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        allowed = literal_choices(hints[f.name])
        if allowed is not None:
            out.append((f.name, allowed, type(None) in typing.get_args(hints[f.name])))
    return tuple(out)


def check_choices(obj) -> None:
    """Check every `Literal`-annotated field of dataclass instance `obj` against its alias.

    The one validation of a choice: dataclasses call it from `__post_init__`, so a bad value is refused
    when the object is built, wherever it came from (Python, a spec string, the command line, a JSON file).

    Args:
        obj: A dataclass instance whose choice fields are annotated with a `Literal` alias.

    Raises:
        ValueError: A field holds a value its `Literal` does not list; the message names the class, the
            field, the allowed values and the value given.
    """
    for name, allowed, optional in _literal_fields(type(obj)):
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if value not in allowed:
            raise ValueError(f"{type(obj).__name__}.{name} must be one of {allowed}, got {value!r}.")


@dataclass
class AstraConfig:
    """Configuration of the Astra initialisation (paper §2.2, Algorithm 1).

    Indices below refer to the eigenvalues of a layer's statistic sorted in *ascending* order,
    λ[0] ≤ λ[1] ≤ … ≤ λ[d-1], with d the layer's output dimension and r its LoRA rank.
    """

    eigen_selection: EigenSelection = field(
        default="smallest",
        metadata={
            "help": (
                "Which r eigenvectors initialise the adapter. 'smallest': indices [0, r), the tail of the "
                "paper's text and Theorem 2.2. 'largest': [d-r, d), what the authors' public code does "
                "(`eigh(...)[1][:, -r:]`). The Table 4 ablations: 'middle': [⌊(d-r)/2⌋, +r); "
                "'lower_quartile': r indices centred on ⌊d/4⌋ (Q1, small eigenvalues); 'upper_quartile': "
                "r indices centred on ⌊3d/4⌋ (Q3, large eigenvalues); 'random': r distinct indices drawn "
                "uniformly with `seed` (and the layer name). With null_space='exclude', d counts only the "
                "non-degenerate eigenvalues and index 0 is the smallest of those."
            )
        },
    )
    statistic: Statistic = field(
        default="covariance",
        metadata={
            "help": (
                "The matrix whose eigenvectors are taken. 'covariance': Cov(Y) = E[YYᵀ] − E[Y]E[Y]ᵀ "
                "(paper Eq. 2). 'second_moment': E[YYᵀ] (Theorem 2.2). 'max_normalized': the authors' "
                "code: each sequence's outputs divided by their maximum element, Σ YᵀY per sequence, "
                "averaged over sequences, never centred (kept for faithful comparison)."
            )
        },
    )
    null_space: NullSpacePolicy = field(
        default="keep",
        metadata={
            "help": (
                "What to do with degenerate (numerically zero) eigenvalues. They are real, not rare: "
                "Cov(Y) = W Cov(x) Wᵀ has rank ≤ d_in, so every layer with d_out > d_in (LLaMA's "
                "gate/up projections) has d_out − d_in zero eigenvalues, whose eigenvectors span W's left "
                "null space and give A = QᵀW = 0. 'keep': select from the full spectrum as the paper does, "
                "with a deterministic basis for any degenerate directions selected (reproducible across "
                "machines). 'exclude': select only among eigenvalues above the threshold. 'raise': raise "
                "if a selected direction is degenerate."
            )
        },
    )
    null_space_rtol: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Eigenvalues ≤ null_space_rtol · λ_max count as degenerate. None uses d · eps(float64), "
                "the tolerance of numpy.linalg.matrix_rank for the float64 decomposition."
            )
        },
    )
    statistic_source: StatisticSource = field(
        default="auto",
        metadata={
            "help": (
                "Where the statistic comes from. 'output': a d_out × d_out Gram of each layer's output. "
                "'input': one d_in × d_in Gram per distinct layer input (q/k/v and gate/up share one), "
                "then Cov(Y) = W Cov(x) Wᵀ exactly (and E[YYᵀ] from E[xxᵀ], E[x] and the bias). 'auto': "
                "per group of layers sharing an input, whichever costs fewer multiply-adds per token. "
                "'max_normalized' (never 'input': each sequence's scale is the max of the layer's outputs) "
                "uses, under 'auto', per layer the cheaper of its output Gram and its own input Gram with "
                "each sequence weighted by its output scale; under 'output', the output Gram."
            )
        },
    )
    accumulation_dtype: AccumulationDtype = field(
        default="float32",
        metadata={
            "help": (
                "dtype of the accumulated sums (Σy, Σyyᵀ). The statistic is then formed and decomposed in "
                "float64 whatever this is. float64 halves the Gram throughput but keeps the far tail of "
                "spectra with massive activations above rounding noise."
            )
        },
    )
    stats_device: StatsDevice = field(
        default="model",
        metadata={
            "help": (
                "Where the accumulated statistics live: 'model' (the device of each layer) or 'cpu' "
                "(saves accelerator memory; each batch's Gram is still computed on the layer's device)."
            )
        },
    )
    max_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Stop calibrating after the batch that brings the count of non-padding tokens to this "
                "budget. None: use the whole dataloader."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for eigen_selection='random'."})
    show_progress: bool = field(
        default=True, metadata={"help": "Show progress bars while calibrating and decomposing (layers done of n)."}
    )

    def __post_init__(self):
        check_choices(self)
        if self.statistic == "max_normalized" and self.statistic_source == "input":
            raise ValueError(
                "statistic='max_normalized' normalises each sequence's outputs by their maximum, which the "
                "input statistics cannot reproduce: use statistic_source='auto' or 'output'."
            )
        if self.null_space_rtol is not None and not 0.0 <= self.null_space_rtol < 1.0:
            raise ValueError(f"AstraConfig.null_space_rtol must be in [0, 1), got {self.null_space_rtol}.")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"AstraConfig.max_tokens must be positive, got {self.max_tokens}.")

    def to_dict(self) -> dict:
        """Every field and its value, as plain JSON-ready data.

        Returns:
            {field name: value}.
        """
        return asdict(self)


def _document_fields(cls: type) -> None:
    """Append an Args section to `cls`'s docstring from its fields' `metadata["help"]`: each option's
    explanation is written once, in the field, and shows in `help(AstraConfig)` and the API docs alike."""
    lines = ["", "Args:"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"    {f.name} (default {default!r}):")
        lines.append(textwrap.fill(f.metadata.get("help", ""), width=100, initial_indent=" " * 8,
                                   subsequent_indent=" " * 8))
    lines += ["", "Raises:",
              "    ValueError: A choice outside its Literal alias, statistic='max_normalized' with",
              "        statistic_source='input', null_space_rtol outside [0, 1), or max_tokens ≤ 0."]
    cls.__doc__ = inspect.cleandoc(cls.__doc__ or "") + "\n" + "\n".join(lines)


_document_fields(AstraConfig)
