"""`ActivationStats`: the sufficient statistics of a calibration, and the matrices derived from them.

Kept as sums (Σv, Σvvᵀ, counts) so ranks and runs can be added together, and saved as safetensors with
a fingerprint of the model they came from, so one calibration serves many ranks, selections and runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import AccumulatorKind, StatsFamily, check_choices

FORMAT = "astra-peft-activation-stats"
VERSION = "1"


@dataclass
class Accumulator:
    """Sums over tokens of one tensor stream: a layer's output, or an input shared by several layers."""

    kind: AccumulatorKind
    sum: torch.Tensor
    gram: torch.Tensor
    tokens: int = 0
    sequences: int = 0

    def __post_init__(self):
        check_choices(self)  # e.g. a statistics file whose accumulator kinds were edited by hand

    @classmethod
    def zeros(cls, kind: AccumulatorKind, dim: int, dtype: torch.dtype, device) -> "Accumulator":
        return cls(kind, torch.zeros(dim, dtype=dtype, device=device), torch.zeros(dim, dim, dtype=dtype, device=device))

    @property
    def dim(self) -> int:
        return self.sum.shape[0]


@dataclass
class LayerRecord:
    acc: int  # index of the accumulator this layer's statistic comes from
    d_out: int
    d_in: int
    digest: str


class ActivationStats:
    """Per-layer calibration statistics (see `collect_activation_stats`)."""

    def __init__(self, layers: dict[str, LayerRecord], accumulators: list[Accumulator], family: str):
        self.layers = layers
        self.accumulators = accumulators
        self.family: StatsFamily = family
        self.seconds: Optional[float] = None

    def __repr__(self) -> str:
        kinds = {k: sum(a.kind == k for a in self.accumulators) for k in ("input", "output", "max_normalized")}
        return f"ActivationStats({len(self.layers)} layers, {self.family}, accumulators={kinds})"

    @property
    def fingerprint(self) -> str:
        text = json.dumps({n: [r.d_out, r.d_in, r.digest] for n, r in sorted(self.layers.items())})
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def tokens(self, name: str) -> int:
        return self.accumulators[self.layers[name].acc].tokens

    def supports(self, statistic: str) -> bool:
        return (statistic == "max_normalized") == (self.family == "max_normalized")

    def source(self, name: str) -> str:
        return self.accumulators[self.layers[name].acc].kind

    def output_statistic(
        self, name: str, statistic: str, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The d_out × d_out matrix `statistic` of layer `name`'s outputs, in float64.

        Input-side statistics need the layer's (d_out, d_in) `weight` and `bias` (see `output_factors`).
        """
        acc = self._accumulator(name, statistic)
        if acc.kind == "input":
            f, g = self.output_factors(name, statistic, weight, bias)
            out = f @ g @ f.T
            return (out + out.T) / 2
        # Formed in float64 whatever the accumulation dtype: with LLMs' massive activations (λ_max ~1e6
        # times the median eigenvalue) float32 rounding of the centring would swamp the tail.
        gram = acc.gram.to(torch.float64)
        if acc.kind == "max_normalized":
            return gram / acc.sequences
        mean, moment = acc.sum.to(torch.float64) / acc.tokens, gram / acc.tokens
        return moment - torch.outer(mean, mean) if statistic == "covariance" else moment

    def output_factors(
        self, name: str, statistic: str, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """F and G with F·G·Fᵀ = the output statistic of a layer with input statistics, y = Wx + b.

        Cov(y) = W Cov(x) Wᵀ; E[yyᵀ] = [W b] E[x̃x̃ᵀ] [W b]ᵀ with x̃ = [x; 1]. The factors let the spectrum
        avoid forming a d_out × d_out matrix of rank ≤ d_in + 1 when d_out is larger.
        """
        acc = self._accumulator(name, statistic)
        if acc.kind != "input":
            raise ValueError(f"Layer '{name}' has {acc.kind} statistics; only input statistics factor.")
        gram, total = acc.gram.to(torch.float64), acc.sum.to(torch.float64)
        mean, moment = total / acc.tokens, gram / acc.tokens
        w = weight.detach().to(device=gram.device, dtype=torch.float64)
        if statistic == "covariance":
            return w, moment - torch.outer(mean, mean)
        if bias is None:
            return w, moment
        b = bias.detach().to(device=gram.device, dtype=torch.float64)
        f = torch.cat([w, b[:, None]], dim=1)
        g = torch.cat([torch.cat([moment, mean[:, None]], dim=1),
                       torch.cat([mean, mean.new_ones(1)])[None, :]], dim=0)
        return f, g

    def _accumulator(self, name: str, statistic: str) -> Accumulator:
        if not self.supports(statistic):
            raise ValueError(f"These statistics were collected for '{self.family}' and cannot give '{statistic}'.")
        acc = self.accumulators[self.layers[name].acc]
        if acc.tokens == 0:
            raise ValueError(f"Layer '{name}' received no calibration tokens.")
        return acc

    # ---- persistence -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (a temp file in the same folder, then a rename)."""
        tensors = {}
        for i, acc in enumerate(self.accumulators):
            tensors[f"acc{i}.sum"] = acc.sum.detach().cpu().contiguous()
            tensors[f"acc{i}.gram"] = acc.gram.detach().cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "version": VERSION,
            "family": self.family,
            "fingerprint": self.fingerprint,
            "layers": json.dumps({n: asdict(r) for n, r in self.layers.items()}),
            "accumulators": json.dumps([[a.kind, a.tokens, a.sequences] for a in self.accumulators]),
        }
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".astra-stats-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "ActivationStats":
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an astra-peft statistics file.")
            if meta.get("version") != VERSION:
                raise ValueError(f"{path} has statistics format version {meta.get('version')}, expected {VERSION}.")
            accs = [
                Accumulator(kind, f.get_tensor(f"acc{i}.sum"), f.get_tensor(f"acc{i}.gram"), tokens, sequences)
                for i, (kind, tokens, sequences) in enumerate(json.loads(meta["accumulators"]))
            ]
        layers = {n: LayerRecord(**r) for n, r in json.loads(meta["layers"]).items()}
        stats = cls(layers, accs, meta["family"])
        if stats.fingerprint != meta["fingerprint"]:
            raise ValueError(f"{path} is corrupt: its fingerprint does not match its layer records.")
        return stats
