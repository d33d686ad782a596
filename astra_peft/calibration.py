"""Calibration: one pass of the frozen model that gathers each target layer's sufficient statistics.

Layers that read the same tensor (q/k/v, gate/up) share one input Gram where that is cheaper than
their output Grams, because Cov(Wx + b) = W Cov(x) Wᵀ exactly. The authors' max-normalised statistic scales each
sequence by its layer's own output maximum m_s; a layer with d_in + 1 < d_out keeps Σ_s (1/m_s²) Σ_t x̃x̃ᵀ
(x̃ = [x; 1]) instead of its output Gram, exact by the same identity, and layers reading one input share that
input's per-sequence Grams. This module plans the accumulators and runs the pass; the hooks that fill them are
_collector.py's.
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

from ._batch_checks import _padding_mask
from ._collector import _Collector, _check_features, _input_of, _tensor_key
from .config import AstraConfig
from .layers import check_supported, layer_digest, out_in_dims, target_base_layers
from .sharding import Lockstep, check_not_fsdp1, gather_during_forward, reshard, unwrap
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
