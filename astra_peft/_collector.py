"""The calibration pass's hooks: how each batch's non-padding activations are added into the planned accumulators.

calibration.py decides which layers share an input and which Gram each accumulator holds (the plan); the
_Collector here registers one forward hook per planned layer, adds each batch's rows (upper strips of the Gram, then
one symmetrisation after the last batch), and removes every hook in `finally`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ._batch_checks import _padding_mask
from .config import AstraConfig
from .layers import out_in_dims
from .sharding import Lockstep, is_dtensor
from .stats import Accumulator


def _input_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)

def _add_upper_gram(gram: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """gram += xᵀx on and above the diagonal blocks (the rest of the upper triangle included), in strips of
    rows: (blocks + 1) / (2·blocks) of a full product's multiply-adds, 5/8 with four strips, on GEMM-sized pieces
    (the inner dimension is the token count). The collector symmetrises once, after the last batch."""
    d = x.shape[1]
    step = -(-d // blocks)
    if d < 256:  # small Grams: one product is faster than several
        gram.addmm_(x.T, x)
        return
    for i in range(0, d, step):
        gram[i : i + step, i:].addmm_(x[:, i : i + step].T, x[:, i:])


class _Collector:
    """Forward hooks that add each batch's non-padding tokens into the planned accumulators."""

    def __init__(self, layers: dict[str, nn.Module], plan, config: AstraConfig):
        self.layers, self.config = layers, config
        self.dtype = getattr(torch, config.accumulation_dtype)
        self.accumulators: list[Accumulator] = []
        self.layer_acc: dict[str, int] = {}
        self.plan = plan
        self.mask: Optional[torch.Tensor] = None
        self.batch_index = 0
        for kind, names in plan:
            # one accumulator per entry, but one per layer for max_normalized_input (each layer has its own m_s)
            for members in ([[n] for n in names] if kind == "max_normalized_input" else [names]):
                for n in members:
                    self.layer_acc[n] = len(self.accumulators)
                d_out, d_in = out_in_dims(layers[members[0]])
                dim = {"input": d_in, "max_normalized_input": d_in + 1}.get(kind, d_out)
                device = "cpu" if config.stats_device == "cpu" else next(layers[members[0]].parameters()).device
                self.accumulators.append(Accumulator.zeros(kind, dim, self.dtype, device))
        self._pending: dict[int, tuple] = {}

    def run(self, model, batches, forward_fn):
        handles = []
        for entry, (kind, names) in enumerate(self.plan):
            for n in names:
                acc_id = self.layer_acc[n]
                if kind == "input":
                    hook = self._input_hook(n, acc_id, len(names))
                    handles.append(self.layers[n].register_forward_pre_hook(hook, with_kwargs=True))
                elif kind == "max_normalized_input":  # needs the output's scales and the input: a post-hook sees both
                    hook = self._weighted_input_hook(n, acc_id, ("group", entry), len(names))
                    handles.append(self.layers[n].register_forward_hook(hook, with_kwargs=True))
                else:
                    handles.append(self.layers[n].register_forward_hook(self._output_hook(n, acc_id)))
        tokens = 0
        bar = tqdm(desc="calibration", unit="tok", disable=not self.config.show_progress)
        lockstep, batches, end = Lockstep(model), iter(batches), object()
        try:
            while True:
                batch = next(batches, end)
                if not lockstep.more(batch is not end):
                    break
                self.mask = _padding_mask(batch)
                self._pending.clear()
                forward_fn(model, batch)
                self.batch_index += 1
                seen = max(acc.tokens for acc in self.accumulators)
                bar.update(seen - tokens)
                tokens = seen
                if lockstep.stop(self.config.max_tokens is not None and tokens >= self.config.max_tokens):
                    break
        finally:
            for h in handles:
                h.remove()
            self._pending.clear()
            self.mask = None
            bar.close()
        for acc in self.accumulators:  # _add fills the upper triangle only
            if acc.kind == "max_normalized_input":  # x̃'s last coordinate is 1: its Gram column is the weighted Σx̃
                acc.gram[:, -1] = acc.sum
            acc.gram.copy_(torch.triu(acc.gram) + torch.triu(acc.gram, 1).T)

    def _rows(self, name: str, act: torch.Tensor) -> torch.Tensor:
        act = act.detach()
        if self.mask is not None:
            if act.shape[:-1] != self.mask.shape:
                raise RuntimeError(
                    f"Layer '{name}' saw activations of shape {tuple(act.shape)}, which do not line up with "
                    f"the attention_mask {tuple(self.mask.shape)}; pass a forward_fn or batches without "
                    "attention_mask for this model."
                )
            rows = act[self.mask.to(act.device)]
        else:
            rows = act.reshape(-1, act.shape[-1])
        return rows

    def _add(self, name: str, acc_id: int, rows: torch.Tensor, sequences: int) -> None:
        """Add rows' Gram (upper triangle) and sum."""
        acc = self.accumulators[acc_id]
        _check_features(name, "input" if acc.kind == "input" else "output", rows, acc.dim)
        x = rows.to(self.dtype)
        batch_sum = x.sum(0)
        if not torch.isfinite(batch_sum).all():
            raise FloatingPointError(
                f"Non-finite activations in layer '{name}' (batch {self.batch_index}); it is the first target "
                "layer, in execution order, where they appear."
            )
        acc.sum += batch_sum.to(acc.sum.device)
        if x.device == acc.gram.device:
            _add_upper_gram(acc.gram, x)
        else:
            acc.gram += torch.triu(x.T @ x).to(acc.gram.device)
        acc.tokens += x.shape[0]
        acc.sequences += sequences

    def _once_per_group(self, slot, name: str, x: torch.Tensor, group_size: int, compute):
        """`compute()` for the first layer of a group to read input `x` in this batch; the group's other layers get
        the same value after checking that they read the very same tensor (x is kept alive until the whole group
        has checked it, so its address cannot be reused by another tensor meanwhile)."""
        pending = self._pending.get(slot)
        if pending is None:
            value = compute()
            if group_size > 1:
                self._pending[slot] = (_tensor_key(x), x, value, 1)
            return value
        key, ref, value, seen = pending
        if _tensor_key(x) != key:
            raise RuntimeError(
                f"Layer '{name}' shared its input with its group during probing but not in batch "
                f"{self.batch_index}; use AstraConfig(statistic_source='output') for this model."
            )
        if seen + 1 == group_size:
            del self._pending[slot]
        else:
            self._pending[slot] = (key, ref, value, seen + 1)
        return value

    def _input_hook(self, name, acc_id, group_size):
        def hook(module, args, kwargs):
            x = _input_of(args, kwargs)
            # the group's one accumulator takes the input once
            self._once_per_group(acc_id, name, x, group_size,
                                 lambda: self._add(name, acc_id, self._rows(name, x), x.shape[0] if x.dim() > 2 else 1))

        return hook

    def _output_hook(self, name, acc_id):
        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            if self.accumulators[acc_id].kind == "max_normalized":
                rows, seqs = self._max_normalized_rows(name, y)
                self._add(name, acc_id, rows, seqs)
            else:
                self._add(name, acc_id, self._rows(name, y), y.shape[0] if y.dim() > 2 else 1)

        return hook

    def _sequence_peaks(self, name, y):
        """(y as (sequences, tokens, d), the valid positions, m_s = |max of each sequence's valid outputs|)."""
        y = y.detach()
        if y.dim() == 2:
            y = y.unsqueeze(0)
        mask = self.mask.to(y.device) if self.mask is not None else None
        if mask is not None and y.shape[:-1] != mask.shape:
            self._rows(name, y)  # raises the shape error
        valid = mask if mask is not None else torch.ones(y.shape[:-1], dtype=torch.bool, device=y.device)
        y = y.to(self.dtype)
        # without padding every position counts: no masked copy of y to take the max of
        masked = y if mask is None else y.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        peak = masked.amax(dim=(1, 2)).abs()
        return y, valid, peak.clamp_min(torch.finfo(self.dtype).tiny)

    def _max_normalized_rows(self, name, y):
        """The authors' statistic: each sequence divided by its largest element (`torch.max(out).abs()`)."""
        y, valid, peak = self._sequence_peaks(name, y)
        scaled = y / peak[:, None, None]
        rows = scaled.reshape(-1, scaled.shape[-1]) if self.mask is None else scaled[valid]  # a view, not a gather
        return rows, int(valid.any(dim=1).sum())

    def _weighted_input_hook(self, name, acc_id, group, group_size):
        """The authors' statistic on the layer's input: Σ_s (1/m_s²)·G_s with G_s = Σ_t x̃x̃ᵀ over sequence s, so
        that W̃·that·W̃ᵀ is Σ_s Σ_t (y/m_s)(y/m_s)ᵀ exactly. The per-sequence Grams G_s (upper strips) are formed once
        per batch by the first layer of the group to run and shared with the others reading the same input."""
        d_out = out_in_dims(self.layers[name])[0]

        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            _check_features(name, "output", y, d_out)  # the scales must come from the whole output
            _, valid, peak = self._sequence_peaks(name, y)
            x = _input_of(args, kwargs).detach()
            parts = self._once_per_group(group, name, x, group_size, lambda: self._sequence_grams(name, x, valid))
            weight = (1 / peak**2).to(parts[0].device)
            self._add_weighted(name, acc_id, parts, weight, int(valid.any(dim=1).sum()))

        return hook

    def _sequence_grams(self, name, x, valid):
        """(sums (S, d), token counts (S,), strips): each sequence's Σx and Gram, the Gram as upper strips
        (S, rows, d − i) starting at column i, padding rows zeroed."""
        x = x.unsqueeze(0) if x.dim() == 2 else x
        if x.shape[:-1] != valid.shape:
            self._rows(name, x)  # raises the shape error
        _check_features(name, "input", x, out_in_dims(self.layers[name])[1])
        x = x.to(self.dtype)
        if self.mask is not None:
            x = x * valid.to(device=x.device, dtype=x.dtype)[..., None]
        sums, counts = x.sum(dim=1), valid.sum(dim=1).to(device=x.device, dtype=x.dtype)
        d = x.shape[-1]
        step = d if d < 256 else -(-d // 4)  # as _add_upper_gram: 5/8 of the full product's work with 4 strips
        xt = x.transpose(1, 2)
        strips = [torch.bmm(xt[:, i : i + step], x[:, :, i:]) for i in range(0, d, step)]
        return sums, counts, strips

    def _add_weighted(self, name, acc_id, parts, weight, sequences) -> None:
        acc = self.accumulators[acc_id]
        sums, counts, strips = parts
        w = weight.to(self.dtype)
        batch_sum = torch.cat([w @ sums, (w @ counts)[None]])
        if not torch.isfinite(batch_sum).all():
            raise FloatingPointError(
                f"Non-finite activations in layer '{name}' (batch {self.batch_index}); it is the first target "
                "layer, in execution order, where they appear."
            )
        acc.sum += batch_sum.to(acc.sum.device)
        d, i = acc.dim - 1, 0
        for strip in strips:  # Σ_s w_s·G_s, strip by strip: one (S) × (S, rows·cols) product each
            rows, cols = strip.shape[1], strip.shape[2]
            acc.gram[i : i + rows, i:d] += (w @ strip.reshape(strip.shape[0], -1)).reshape(rows, cols).to(acc.gram.device)
            i += rows
        acc.tokens += int(counts.sum())
        acc.sequences += sequences

def _check_features(name: str, side: str, t: torch.Tensor, dim: int) -> None:
    if t.shape[-1] != dim or is_dtensor(t):
        # e.g. tensor parallelism: each rank sees a slice of the features (or a DTensor of them)
        raise RuntimeError(
            f"Layer '{name}': its {side} activations have {t.shape[-1]} features here "
            f"({type(t).__name__}), where the layer has {dim}: they are sharded (tensor parallelism?), "
            "which Astra's calibration does not support. Calibrate an unsharded copy (or the FSDP2/ZeRO-3 model "
            "without tensor parallelism) and pass the statistics with `stats=`."
        )
