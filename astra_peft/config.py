"""`AstraConfig`: every choice the paper leaves open, made explicit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

EIGEN_SELECTIONS = ("smallest", "largest", "middle", "lower_quartile", "upper_quartile", "random")
STATISTICS = ("covariance", "second_moment", "max_normalized")
NULL_SPACE_POLICIES = ("keep", "exclude", "raise")
STATISTIC_SOURCES = ("auto", "input", "output")


@dataclass
class AstraConfig:
    """Configuration of the Astra initialisation (paper §2.2, Algorithm 1).

    Indices below refer to the eigenvalues of a layer's statistic sorted in *ascending* order,
    λ[0] ≤ λ[1] ≤ … ≤ λ[d-1], with d the layer's output dimension and r its LoRA rank.
    """

    eigen_selection: Literal["smallest", "largest", "middle", "lower_quartile", "upper_quartile", "random"] = field(
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
    statistic: Literal["covariance", "second_moment", "max_normalized"] = field(
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
    null_space: Literal["keep", "exclude", "raise"] = field(
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
    statistic_source: Literal["auto", "input", "output"] = field(
        default="auto",
        metadata={
            "help": (
                "Where the statistic comes from. 'output': a d_out × d_out Gram of each layer's output. "
                "'input': one d_in × d_in Gram per distinct layer input (q/k/v and gate/up share one), "
                "then Cov(Y) = W Cov(x) Wᵀ exactly (and E[YYᵀ] from E[xxᵀ], E[x] and the bias). 'auto': "
                "per group of layers sharing an input, whichever costs fewer multiply-adds per token. "
                "'max_normalized' always uses outputs."
            )
        },
    )
    accumulation_dtype: Literal["float32", "float64"] = field(
        default="float32",
        metadata={
            "help": (
                "dtype of the accumulated sums (Σy, Σyyᵀ). The statistic is then formed and decomposed in "
                "float64 whatever this is. float64 halves the Gram throughput but keeps the far tail of "
                "spectra with massive activations above rounding noise."
            )
        },
    )
    stats_device: Literal["model", "cpu"] = field(
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
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar while calibrating."})

    def __post_init__(self):
        choices = {
            "eigen_selection": EIGEN_SELECTIONS,
            "statistic": STATISTICS,
            "null_space": NULL_SPACE_POLICIES,
            "statistic_source": STATISTIC_SOURCES,
            "accumulation_dtype": ("float32", "float64"),
            "stats_device": ("model", "cpu"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"AstraConfig.{name} must be one of {allowed}, got {value!r}.")
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
        return asdict(self)
