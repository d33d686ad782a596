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

FORMAT = "astra-peft-activation-stats"
VERSION = "1"


@dataclass
class Accumulator:
    """Sums over tokens of one tensor stream: a layer's output, or an input shared by several layers."""

    kind: str  # "input" | "output" | "max_normalized"
    sum: torch.Tensor
    gram: torch.Tensor
    tokens: int = 0
    sequences: int = 0

    @classmethod
    def zeros(cls, kind: str, dim: int, dtype: torch.dtype, device) -> "Accumulator":
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
        self.family = family  # "moments" (serves covariance and second_moment) | "max_normalized"
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

        Input-side statistics need the layer's (d_out, d_in) `weight` and `bias`: for y = Wx + b,
        Cov(y) = W Cov(x) Wᵀ and E[yyᵀ] = W E[xxᵀ] Wᵀ + (Wμ)bᵀ + b(Wμ)ᵀ + bbᵀ.
        """
        if not self.supports(statistic):
            raise ValueError(f"These statistics were collected for '{self.family}' and cannot give '{statistic}'.")
        acc = self.accumulators[self.layers[name].acc]
        if acc.tokens == 0:
            raise ValueError(f"Layer '{name}' received no calibration tokens.")
        # Formed in float64 whatever the accumulation dtype: with LLMs' massive activations (λ_max ~1e6
        # times the median eigenvalue) float32 rounding of W·C·Wᵀ or of the centring would swamp the tail.
        gram, total = acc.gram.to(torch.float64), acc.sum.to(torch.float64)
        if acc.kind == "max_normalized":
            return gram / acc.sequences
        mean = total / acc.tokens
        moment = gram / acc.tokens
        matrix = moment - torch.outer(mean, mean) if statistic == "covariance" else moment
        if acc.kind == "output":
            return matrix
        if weight is None:
            raise ValueError(f"Layer '{name}' has input statistics: its weight is needed to derive outputs'.")
        w = weight.detach().to(device=matrix.device, dtype=matrix.dtype)
        out = w @ matrix @ w.T
        if statistic == "second_moment" and bias is not None:
            b = bias.detach().to(device=matrix.device, dtype=matrix.dtype)
            wm = w @ mean
            out = out + torch.outer(wm, b) + torch.outer(b, wm) + torch.outer(b, b)
        return (out + out.T) / 2

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
