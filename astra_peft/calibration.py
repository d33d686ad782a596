"""Calibration: one pass of the frozen model that gathers each target layer's sufficient statistics.

Layers that read the same tensor (q/k/v, gate/up) share one input Gram where that is cheaper than
their output Grams, because Cov(Wx + b) = W Cov(x) Wᵀ exactly. The authors' max-normalised statistic scales each
sequence by its layer's own output maximum m_s; a layer with d_in + 1 < d_out keeps Σ_s (1/m_s²) Σ_t x̃x̃ᵀ
(x̃ = [x; 1]) instead of its output Gram, exact by the same identity, and layers reading one input share that
input's per-sequence Grams.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Mapping
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ._batch_checks import _padding_mask
from .config import AstraConfig
from .layers import check_supported, layer_digest, out_in_dims, target_base_layers
from .sharding import Lockstep, check_not_fsdp1, gather_during_forward, is_dtensor, reshard, unwrap
from .stats import Accumulator, ActivationStats, LayerRecord

ForwardFn = Callable[[nn.Module, Mapping], object]


def default_forward(model: nn.Module, batch) -> object:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"A calibration batch is a {type(batch).__name__}; the default forward needs a mapping of model inputs "
            "such as {'input_ids': (batch, seq_len) tensor, 'attention_mask': ...}: use "
            "`astra_peft.calibration_batches(data, tokenizer)`, or pass `forward_fn` for other batch types."
        )
    return model(**batch)


def collect_activation_stats(
    model: nn.Module,
    dataloader: Iterable,
    lora_config=None,
    astra_config: Optional[AstraConfig] = None,
    *,
    forward_fn: Optional[ForwardFn] = None,
    adapter_name: str = "default",
) -> ActivationStats:
    """Run `dataloader` through the frozen `model` and return every target layer's statistics.

    Hooks collect each layer's sums (input Grams shared by layers that read one input, where cheaper, else
    output Grams); they are removed in `finally`, whether the pass succeeds or fails.

    Args:
        model: The plain base model (then `lora_config.target_modules` picks the layers) or a PeftModel of it
            (then its LoRA layers for `adapter_name` do; adapters are disabled during the pass so the
            statistics describe the base model); a DeepSpeed engine or DDP wrapper is unwrapped.
        dataloader: Batches `model(**batch)` accepts (or `forward_fn` takes). Padding positions
            (`attention_mask == 0`) are left out.
        lora_config: The LoraConfig whose `target_modules` to calibrate, for a plain model.
        astra_config: Which statistic family, accumulation dtype and device, token budget; the defaults
            otherwise.
        forward_fn: `forward_fn(model, batch)` runs one batch, for models that need another call.
        adapter_name: On a PeftModel, the adapter whose layers to calibrate.

    Returns:
        `ActivationStats` for every target layer, summed over ranks when a process group is running; pass it
        to `initialize_astra_weights(stats=...)` or save it.

    Raises:
        ValueError: No target layer matched, the dataloader is empty, or a batch is not (batch, seq_len).
        TypeError: A target layer Astra does not support, a batch value that is not a tensor, or an FSDP1 model.
        RuntimeError: Activations that do not line up with the attention mask, or layers that shared an input
            while probing but not later (use `statistic_source='output'`).
        FloatingPointError: Non-finite activations (the first target layer where they appear is named).
    """
    astra_config = astra_config or AstraConfig()
    model = unwrap(model)  # a DeepSpeed engine or DDP: the model inside
    check_not_fsdp1(model)
    layers = target_base_layers(model, lora_config, adapter_name)
    if not layers:
        raise ValueError(
            "No target layer matched: check `target_modules` "
            f"({getattr(lora_config, 'target_modules', None)!r}) against the model's module names."
        )
    for name, layer in layers.items():
        check_supported(name, layer)
    family = "max_normalized" if astra_config.statistic == "max_normalized" else "moments"
    start = time.perf_counter()
    # A ZeRO-3-partitioned model before `deepspeed.initialize` runs only with its modules gathered one at a time.
    with _calibration_mode(model), gather_during_forward(model):
        batches = iter(dataloader)
        first = next(batches, None)
        if not Lockstep(model).more(first is not None):  # on a sharded model, every rank must have a first batch
            raise ValueError("The calibration dataloader is empty.")
        _padding_mask(first)  # a malformed batch fails here, not inside the model during probing
        forward_fn = forward_fn or default_forward
        groups = _shared_input_groups(model, layers, first, forward_fn)
        collector = _Collector(layers, _plan(layers, groups, astra_config, family), astra_config)
        collector.run(model, _chain(first, batches), forward_fn)
    accumulators = collector.accumulators
    _all_reduce(accumulators)
    records = {
        name: LayerRecord(acc=collector.layer_acc[name], d_out=out_in_dims(layer)[0],
                          d_in=out_in_dims(layer)[1], digest=layer_digest(layer))
        for name, layer in layers.items()
    }
    stats = ActivationStats(records, accumulators, family)
    stats.seconds = time.perf_counter() - start
    stats._modules = {name: weakref.ref(layer) for name, layer in layers.items() if stats.factored(name)}
    return stats


def effective_rank_stats(
    model: nn.Module, dataloader: Iterable, modules: dict[str, nn.Module], *, forward_fn=None, max_tokens=None,
    show_progress: bool = True,
) -> ActivationStats:
    """Output statistics of `modules` exactly as they run (LoRA layers include their adapter)."""
    config = AstraConfig(statistic_source="output", max_tokens=max_tokens, show_progress=show_progress)
    groups = [[name] for name in modules]
    collector = _Collector(modules, _plan(modules, groups, config, "moments"), config)
    with _calibration_mode(model, disable_adapters=False), gather_during_forward(model):
        collector.run(model, dataloader, forward_fn or default_forward)
    records = {}
    for name, module in modules.items():
        d_out, d_in = out_in_dims(module)
        records[name] = LayerRecord(acc=collector.layer_acc[name], d_out=d_out, d_in=d_in, digest="")
    return ActivationStats(records, collector.accumulators, "moments")


@contextlib.contextmanager
def _calibration_mode(model: nn.Module, disable_adapters: bool = True):
    # Restore each module's own flag: a wrapper can say training=True over modules left in eval mode.
    modes = [(m, m.training) for m in model.modules()]
    # FSDP2 swaps parameter objects between forwards (sharded DTensors ↔ unsharded copies), and PEFT's
    # disable_adapter sets requires_grad on whichever objects are in place when it enters and exits: start and
    # end sharded, and put every flag back, or the adapter silently stops being trainable.
    reshard(model)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    disable = getattr(model, "disable_adapter", None) if disable_adapters else None
    try:
        with torch.no_grad(), (disable() if callable(disable) else contextlib.nullcontext()):
            try:
                yield
            finally:
                reshard(model)
    finally:
        for module, mode in modes:
            module.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def _chain(first, rest):
    yield first
    yield from rest


def _input_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()), x.dtype)


def _shared_input_groups(model, layers: dict[str, nn.Module], batch, forward_fn) -> list[list[str]]:
    """Which target layers read the very same input tensor, found on a tiny slice of the first batch.

    The inputs stay referenced until the probe ends, so a freed tensor's address can't be reused by a
    later layer and mistaken for a shared input.
    """
    seen: dict[str, tuple] = {}
    alive: list[torch.Tensor] = []

    def hook_for(name):
        def hook(module, args, kwargs):
            x = _input_of(args, kwargs)
            alive.append(x)
            seen.setdefault(name, _tensor_key(x))

        return hook

    def check_output(name):  # a sliced output (tensor parallelism) is named here, not by a shape error downstream
        def hook(module, args, output):
            _check_features(name, "output", output[0] if isinstance(output, tuple) else output,
                            out_in_dims(layers[name])[0])

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, layer in layers.items()]
    handles += [layer.register_forward_hook(check_output(n)) for n, layer in layers.items()]
    try:
        try:
            forward_fn(model, _slice_batch(batch))
        except Exception:  # a model that cannot run a one-row slice: probe on the whole batch instead
            seen.clear()
            alive.clear()
            forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
        alive.clear()
    by_key: dict[tuple, list[str]] = {}
    for name in layers:
        by_key.setdefault(seen.get(name, ("unseen", name)), []).append(name)
    return list(by_key.values())


def _slice_batch(batch, max_len: int = 8):
    if not isinstance(batch, Mapping):  # any Mapping: collators return BatchEncoding, a UserDict
        return batch
    ref = next((v for v in batch.values() if torch.is_tensor(v) and v.dim() >= 2), None)
    if ref is None:
        return batch
    rows, length = ref.shape[:2]

    def cut(v):
        if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != rows:
            return v
        v = v[:1]
        return v[:, :max_len] if v.dim() >= 2 and v.shape[1] == length else v

    return {k: cut(v) for k, v in batch.items()}


def _plan(layers, groups, config: AstraConfig, family: str) -> list[tuple[str, list[str]]]:
    """(kind, layer names) per accumulator: one input Gram per group, or one output Gram per layer."""
    plan = []
    if family == "max_normalized":
        # Each layer has its own per-sequence scales m_s, so each keeps its own weighted Gram of x̃ = [x; 1]: under
        # 'auto' where that is smaller than its output Gram (d_in + 1 < d_out, e.g. gate/up). Layers reading one
        # input share its per-sequence Grams, one Gram's work per batch (see _Collector._weighted_input_hook).
        for group in groups:
            d_in = out_in_dims(layers[group[0]])[1]
            weighted = [n for n in group
                        if config.statistic_source == "auto" and d_in + 1 < out_in_dims(layers[n])[0]]
            if weighted:
                plan.append(("max_normalized_input", weighted))
            plan.extend(("max_normalized", [n]) for n in group if n not in weighted)
        return plan
    for group in groups:
        d_in = out_in_dims(layers[group[0]])[1]
        output_cost = sum(out_in_dims(layers[n])[0] ** 2 for n in group)
        use_input = config.statistic_source == "input" or (
            config.statistic_source == "auto" and d_in**2 <= output_cost
        )
        if use_input:
            plan.append(("input", group))
        else:
            plan.extend(("output", [n]) for n in group)
    return plan


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


def _all_reduce(accumulators: list[Accumulator]) -> None:
    """Sum the sufficient statistics over ranks, so every rank initialises from the union of the data."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    on_gpu = dist.get_backend() == "nccl"

    def reduce(t: torch.Tensor) -> None:
        if on_gpu and t.device.type == "cpu":
            tmp = t.cuda()
            dist.all_reduce(tmp)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t)

    for acc in accumulators:
        reduce(acc.sum)
        reduce(acc.gram)
    counts = torch.tensor([[acc.tokens, acc.sequences] for acc in accumulators], dtype=torch.float64)
    reduce(counts)
    for acc, (tokens, sequences) in zip(accumulators, counts.tolist()):
        acc.tokens, acc.sequences = int(tokens), int(sequences)
