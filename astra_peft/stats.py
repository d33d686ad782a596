"""`ActivationStats`: the sufficient statistics of a calibration, and the matrices derived from them.

Kept as sums (Σv, Σvvᵀ, counts) so ranks and runs can be added together, and saved as safetensors with
a fingerprint of the model they came from, so one calibration serves many ranks, selections and runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_path
from .config import AccumulatorKind, StatsFamily, check_choices
from .layers import layer_digest, weight_matrix

FORMAT = "astra-peft-activation-stats"
# 2: a content hash over every tensor and metadata field (version 1 files had a fingerprint of the layer list
# only, so edited token counts or Gram tensors loaded without complaint).
VERSION = "2"
HASH_KEY = "content_sha256"
_KINDS = ("input", "output", "max_normalized", "max_normalized_input")
# The accumulator kinds whose statistic is F·G·Fᵀ with F the layer's weight (see `ActivationStats.factored`).
_FACTORED = ("input", "max_normalized_input")
_FAMILIES = ("moments", "max_normalized")


def content_hash(tensors: dict, metadata: dict) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata field but the hash itself."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    fields = {k: v for k, v in metadata.items() if k != HASH_KEY}
    h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class Accumulator:
    """Sums over tokens of one tensor stream: a layer's output, or an input shared by several layers.

    Kind "max_normalized_input" (the authors' statistic, accumulated on a layer's inputs where d_in + 1 < d_out):
    `gram` is Σ_s (1/m_s²) Σ_t x̃x̃ᵀ over sequences s with x̃ = [x; 1] and m_s = |max of the sequence's valid
    outputs|, so its last row and column hold Σ_s (1/m_s²) Σ_t x and Σ_s T_s/m_s²; `sum` is that last column.
    """

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
    """Per-layer calibration statistics, made by `collect_activation_stats`.

    Kept as sums (Σv, Σvvᵀ, token and sequence counts), so they can be saved, reloaded and summed over ranks, and
    one calibration serves many ranks, selections and runs.

    Args:
        layers: {layer name: `LayerRecord`}: which accumulator holds the layer's statistic, its dimensions and
            the fingerprint of the weights it was collected on.
        accumulators: The sums, one per input shared by several layers or per layer output.
        family: What the sums can give: "moments" (covariance and second_moment) or "max_normalized".

    Attributes:
        seconds: Wall time of the calibration that made them (None once reloaded).
    """

    def __init__(self, layers: dict[str, LayerRecord], accumulators: list[Accumulator], family: str):
        self.layers = layers
        self.accumulators = accumulators
        self.family: StatsFamily = family
        self.seconds: Optional[float] = None
        # The calibrated modules, weakly: a max-normalised statistic kept on a layer's inputs needs its weight to
        # be formed, and `output_statistic(name, "max_normalized")` is asked without one. Not saved.
        self._modules: dict[str, weakref.ref] = {}

    def __repr__(self) -> str:
        kinds = {k: sum(a.kind == k for a in self.accumulators) for k in _KINDS}
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

    def factored(self, name: str) -> bool:
        """Whether layer `name`'s statistic is kept on its inputs, so `output_factors` (with its weight) gives it."""
        return self.source(name) in _FACTORED

    def output_statistic(
        self, name: str, statistic: str, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The d_out × d_out matrix `statistic` of layer `name`'s outputs, in float64.

        Args:
            name: The layer's name in the base model.
            statistic: "covariance", "second_moment" or "max_normalized" (as the statistics' family allows).
            weight: The layer's (d_out, d_in) weight; needed when the layer's statistics were taken on its input
                (see `output_factors`), ignored otherwise.
            bias: The layer's bias, if any (same condition).

        Returns:
            The symmetric float64 matrix.

        Raises:
            ValueError: The family cannot give `statistic`, or the layer received no calibration tokens.
        """
        acc = self._accumulator(name, statistic)
        if acc.kind in _FACTORED:
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
        if acc.kind not in _FACTORED:
            raise ValueError(f"Layer '{name}' has {acc.kind} statistics; only input statistics factor.")
        if acc.kind == "max_normalized_input":
            weight, bias = self._weight(name, weight, bias)
        gram, total = acc.gram.to(torch.float64), acc.sum.to(torch.float64)
        if acc.kind == "max_normalized_input":
            # Σ_s (1/m_s²) Σ_t y yᵀ / S with y = [W b]·x̃: F = [W b], G = the weighted Gram of x̃ over S sequences.
            g = gram / acc.sequences
            w = weight.detach().to(device=gram.device, dtype=torch.float64)
            if bias is None:
                return w, g[:-1, :-1]
            b = bias.detach().to(device=gram.device, dtype=torch.float64)
            return torch.cat([w, b[:, None]], dim=1), g
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

    def _weight(self, name: str, weight, bias):
        """The layer's (weight, bias): as given, else those of the module calibrated, if it is unchanged."""
        if weight is not None:
            return weight, bias
        ref = self._modules.get(name)
        module = ref() if ref is not None else None
        if module is None or layer_digest(module) != self.layers[name].digest:
            raise ValueError(
                f"Layer '{name}': its max-normalised statistic was accumulated on the layer's inputs (cheaper where "
                "d_in < d_out), so forming it needs the layer's weight: pass weight= (d_out × d_in) and bias=, or "
                "calibrate with AstraConfig(statistic_source='output')."
            )
        return weight_matrix(module), getattr(module, "bias", None)

    def _accumulator(self, name: str, statistic: str) -> Accumulator:
        if not self.supports(statistic):
            raise ValueError(f"These statistics were collected for '{self.family}' and cannot give '{statistic}'.")
        acc = self.accumulators[self.layers[name].acc]
        if acc.tokens == 0:
            raise ValueError(f"Layer '{name}' received no calibration tokens.")
        return acc

    # ---- persistence -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (a temp file in the same folder, then a rename).

        Args:
            path: The file to write; its folder is created if missing. `load` reads it back, checking a content
                hash over every tensor and metadata field.
        """
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
        metadata[HASH_KEY] = content_hash(tensors, metadata)
        with atomic_path(path) as tmp:  # the project's one atomic-write helper (astra_peft/_io.py)
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "ActivationStats":
        """Read statistics written by `save`, checking every byte: the content hash covers each tensor and each
        metadata field (token counts included), and the records must agree with the tensors' shapes.

        Args:
            path: A statistics file. Anything but a regular file (a FIFO, whose open would block; a folder; a
                device) is refused before it is opened.
            device: Where the tensors go once checked.

        Returns:
            The statistics.

        Raises:
            ValueError: Naming `path`, when it is not a regular file, not a statistics file, of another format
                version, or its content does not match its hash (edited or damaged).
        """
        import stat

        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            raise ValueError(f"{path}: cannot read the statistics file ({err.strerror or err}).") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is not a regular file; a statistics file is a .safetensors file.")
        try:
            handle = safe_open(os.fspath(path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise ValueError(f"{path} is not a readable safetensors file ({err}).") from None
        with handle as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an astra-peft statistics file.")
            if meta.get("version") != VERSION:
                raise ValueError(f"{path} has statistics format version {meta.get('version')}, expected {VERSION}; "
                                 f"collect the statistics again.")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if HASH_KEY not in meta or content_hash(tensors, meta) != meta[HASH_KEY]:
            raise ValueError(f"{path} is corrupt or was edited: its content hash does not match its tensors and "
                             f"metadata; collect the statistics again.")
        try:
            stats = cls._from_parts(tensors, meta)
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a consistent statistics file ({err}).") from None
        if stats.fingerprint != meta["fingerprint"]:
            raise ValueError(f"{path} is corrupt: its fingerprint does not match its layer records.")
        for acc in stats.accumulators:
            acc.sum, acc.gram = acc.sum.to(device), acc.gram.to(device)
        return stats

    @classmethod
    def _from_parts(cls, tensors: dict, meta: dict) -> "ActivationStats":
        """Rebuild from a file's tensors and metadata, checking that they describe one another."""
        records = json.loads(meta["accumulators"])
        if meta["family"] not in _FAMILIES:
            raise ValueError(f"unknown family {meta['family']!r}")
        expected = {f"acc{i}.{part}" for i in range(len(records)) for part in ("sum", "gram")}
        if set(tensors) != expected:
            raise ValueError(f"tensors {sorted(set(tensors) ^ expected)[:3]} do not match the accumulator records")
        accs = []
        for i, (kind, tokens, sequences) in enumerate(records):
            total, gram = tensors[f"acc{i}.sum"], tensors[f"acc{i}.gram"]
            if kind not in _KINDS or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                             for n in (tokens, sequences)):
                raise ValueError(f"accumulator {i} has a bad record {[kind, tokens, sequences]!r}")
            if total.dim() != 1 or gram.shape != (total.shape[0], total.shape[0]):
                raise ValueError(f"accumulator {i}: shapes {tuple(total.shape)} and {tuple(gram.shape)} disagree")
            if not (torch.isfinite(total).all() and torch.isfinite(gram).all()):
                raise ValueError(f"accumulator {i} holds NaN or infinite values")
            if (kind in ("max_normalized", "max_normalized_input")) != (meta["family"] == "max_normalized"):
                raise ValueError(f"accumulator {i} of kind {kind!r} does not belong to family {meta['family']!r}")
            accs.append(Accumulator(kind, total, gram, tokens, sequences))
        layers = {n: LayerRecord(**r) for n, r in json.loads(meta["layers"]).items()}
        for name, record in layers.items():
            if not (isinstance(record.acc, int) and 0 <= record.acc < len(accs)):
                raise ValueError(f"layer {name!r} points at accumulator {record.acc!r}, which does not exist")
            dim = accs[record.acc].dim
            if accs[record.acc].kind == "max_normalized_input":
                if dim != record.d_in + 1:
                    raise ValueError(f"layer {name!r} ({record.d_out}×{record.d_in}) does not fit its weighted input "
                                     f"accumulator of {dim}")
            elif dim not in (record.d_in, record.d_out):
                raise ValueError(f"layer {name!r} ({record.d_out}×{record.d_in}) does not fit its accumulator of {dim}")
        return cls(layers, accs, meta["family"])
