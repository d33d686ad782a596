"""Weights that DeepSpeed ZeRO-3 or FSDP2 split across ranks: read whole, written back where training sees them.

Astra reads each target layer's full weight W (its fingerprint, A = QᵀW) and writes A, B and W − s·B·A. On a
sharded model each rank holds a slice, so:

- ZeRO-3 (`deepspeed.zero.Init`, `HfDeepSpeedConfig`, or after `deepspeed.initialize`): parameters carry `ds_id`
  and are gathered one layer at a time (`GatheredParameters`), never nested. Before an engine exists nothing
  gathers them during a forward, so calibration gathers each module's own parameters around its forward. After
  `deepspeed.initialize` the optimizer keeps fp32 master partitions of the trainable parameters and copies them
  over the model's on every step: A and B are written into those masters too, or the first step would restore
  PEFT's default A/B over a residual base.
- FSDP2 (`fully_shard`): parameters are DTensors, read with `full_tensor()` and written back with
  `distribute_tensor` to the same mesh and placements (FSDP2's optimizer steps on these very DTensors), after
  `reshard()`: a forward leaves the root unit holding unsharded copies that are discarded, not written back.
- FSDP1 (`FullyShardedDataParallel`, flat parameters), flattened or empty weights, sharded activations (tensor
  parallelism): refused, naming the module or layer.

Every rank must call Astra, in the same order, with the same layers, and calibrate on the same number of
batches (`Lockstep` checks it): reading or writing a sharded weight, and every forward, is collective.
`adapter_state_dict` gathers an adapter for saving (PEFT's own `save_pretrained` writes ZeRO-3's placeholders).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn

# DeepSpeed's marker for a parameter inside a user's GatheredParameters context (partition_parameters.py).
_DS_DEPTH_ATTR = "_ds_z3_gathered_param_context_depth"


def is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing can be one
        return False
    return isinstance(p, DTensor)


def is_flat(p: torch.Tensor) -> bool:
    """An FSDP1 FlatParameter (the whole wrapped block's weights in one 1-D tensor)."""
    return bool(getattr(p, "_is_flat_param", False)) or type(p).__name__ == "FlatParameter"


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape the unsharded tensor has (ZeRO-3 keeps an empty placeholder in `p` between gathers)."""
    return tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape)


def check_not_fsdp1(model: nn.Module) -> None:
    """Refuse a model under FSDP1, whose layers' weights are views into flat parameters Astra cannot rewrite.

    Raises:
        TypeError: `model` is, or contains, a `FullyShardedDataParallel` module or a flat parameter; the
            message names the module and says to initialise before wrapping, or to use FSDP2.
    """
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel" or any(
            is_flat(p) for p in module.parameters(recurse=False)
        ):
            where = f"Module '{name}'" if name else "The model"
            raise TypeError(
                f"{where} is wrapped by FSDP1 (FullyShardedDataParallel, flat parameters): Astra cannot read or "
                "rewrite its layers' weights. Initialise Astra before wrapping the model, or shard it with FSDP2 "
                "(torch.distributed.fsdp.fully_shard), which Astra supports."
            )


def _gathered_elsewhere(p: torch.Tensor) -> bool:
    """Already whole: persistent (small parameters an engine never partitions away), inside an engine's
    forward, or inside the caller's own GatheredParameters. Gathering it again would either nest contexts or,
    on release, free a persistent parameter under the engine."""
    return p.ds_status.name != "NOT_AVAILABLE" or _in_user_context(p)


def _in_user_context(p: torch.Tensor) -> bool:
    return getattr(p, _DS_DEPTH_ATTR, 0) > 0


def _gather(params: list, modifier_rank: Optional[int]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


@contextlib.contextmanager
def full_tensors(params: Iterable[Optional[torch.Tensor]]):
    """Yield each parameter's full value (None stays None), for reading only.

    ZeRO-3 parameters not already gathered are gathered for the duration (one context, never nested in one of
    ours); DTensors are all-gathered into a plain tensor; plain tensors are yielded as they are (detached).

    Args:
        params: Parameters (or None, e.g. a missing bias); on a sharded model every rank passes the same ones.

    Yields:
        A list of full tensors, in the order of `params`; valid only inside the context.
    """
    params = list(params)
    partitioned = [p for p in params if p is not None and is_zero3(p) and not _gathered_elsewhere(p)]
    with _gather(partitioned, None) if partitioned else contextlib.nullcontext():
        yield [None if p is None else (p.full_tensor() if is_dtensor(p) else p).detach() for p in params]


def assign(layer_name: str, values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write full values into parameters, wherever their shards and master copies live.

    Every rank computes the same values from the same all-reduced statistics; rank 0's are the ones that
    ZeRO-3 keeps (`modifier_rank=0` broadcasts them on release).

    Args:
        layer_name: The layer the parameters belong to, for error messages.
        values: (parameter, its new full value) pairs; the value's shape is the parameter's unsharded shape.

    Raises:
        RuntimeError: a value's shape is not its parameter's (nothing is written); a ZeRO-3 parameter is already
            gathered by the caller's own `GatheredParameters`, whose exit would discard or overwrite the new
            values (nothing is written); or a DeepSpeed optimizer's fp32 master did not take the new value.
    """
    for p, v in values:
        if tuple(v.shape) != logical_shape(p):
            raise RuntimeError(f"Layer '{layer_name}': a {tuple(v.shape)} value for a {logical_shape(p)} weight.")
    zero3 = [p for p, _ in values if is_zero3(p)]
    if any(_in_user_context(p) for p in zero3):
        raise RuntimeError(
            f"Layer '{layer_name}': its ZeRO-3 parameters are already gathered (an outer "
            "deepspeed.zero.GatheredParameters?), and leaving that context would discard what Astra writes. "
            "Call initialize_astra_weights outside GatheredParameters: Astra gathers one layer at a time itself."
        )
    with torch.no_grad(), _gather(zero3, 0) if zero3 else contextlib.nullcontext():
        for p, v in values:
            if is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(v.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements))
            else:
                p.data.copy_(v.to(device=p.device, dtype=p.dtype))
    for p, v in values:
        _write_master(layer_name, p, v)


def _write_master(layer_name: str, p: torch.Tensor, value: torch.Tensor) -> None:
    """The fp32 master partition a DeepSpeed optimizer keeps of a trainable parameter, if any.

    Each step copies the masters over the model's parameters, so without this the first step would restore
    the values they held when the engine was built.
    """
    if not p.requires_grad:
        return  # a frozen weight has no master: its partition is what training reads
    value = value.detach().to(torch.float32)
    optimizer = getattr(p, "_z3_optimizer", None) if is_zero3(p) else None
    if optimizer is not None:  # ZeRO-3
        optimizer.set_full_hp_param(value.to(p.ds_tensor.device), p)
        stored = optimizer.get_full_hp_param(p)
    elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, DeepSpeed's bf16 optimizer; None where no fragment is on this rank,
        # but the read-back is a collective, so every rank takes this branch
        p.set_full_hp_param(value.to(p.device))
        stored = p.get_full_hp_param()
    else:
        return
    # Read back: a master this code misses (offloaded, swapped, another optimizer) must fail loudly, not train
    # from PEFT's default A/B over a residual base.
    if stored is None or not torch.equal(stored.detach().cpu().reshape(value.shape), value.cpu()):
        raise RuntimeError(
            f"Layer '{layer_name}': could not write Astra's values into the DeepSpeed optimizer's fp32 master "
            "copy (an optimizer or offload this code does not know), so training would start from PEFT's default "
            "A/B over a residual base. The layers before it are already rewritten: rebuild the model, and "
            "initialise Astra before `deepspeed.initialize` / `trainer.train()`."
        )


@contextlib.contextmanager
def gather_during_forward(model: nn.Module):
    """Gather each module's own ZeRO-3 parameters around its forward, and release them after it.

    A model partitioned by `deepspeed.zero.Init` (or `HfDeepSpeedConfig` + `from_pretrained`) cannot run a
    forward before `deepspeed.initialize` installs its hooks ("'weight' must be 2-D"). One module at a time
    keeps the peak at one layer's weights. Where an engine's hooks (registered earlier, so run first) or the
    caller's own gather already made a parameter whole, it is left alone: no GatheredParameters is ever nested.
    """
    modules = [m for m in model.modules() if any(is_zero3(p) for p in m.parameters(recurse=False))]
    if not modules:
        yield
        return
    open_contexts: dict[int, list] = {}

    def pre(module, args):
        params = [p for p in module.parameters(recurse=False) if is_zero3(p) and not _gathered_elsewhere(p)]
        context = _gather(params, None) if params else contextlib.nullcontext()
        context.__enter__()
        open_contexts.setdefault(id(module), []).append(context)

    def post(module, args, output):
        stack = open_contexts.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
        for stack in open_contexts.values():  # a forward that raised left its module's gather open
            while stack:
                stack.pop().__exit__(None, None, None)


class Lockstep:
    """Keeps every rank's calibration loop in step on a sharded model.

    Under ZeRO-3 or FSDP2 each forward is a collective operation, so a rank with one batch more than the others
    would wait for them forever, as would one that stops early at `max_tokens`. Before each batch the ranks agree
    that all of them have one (or raise, on every rank, if only some do); after it they stop together when any
    rank has reached its token cap. Off (no communication) for unsharded models or a single process.
    """

    def __init__(self, model: nn.Module):
        import torch.distributed as dist

        self.active = (
            dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and any(is_zero3(p) or is_dtensor(p) for p in model.parameters())
        )
        self.batch_index = 0

    def _sum(self, values: list[int], op=None) -> list[int]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def more(self, has_batch: bool) -> bool:
        """Whether every rank runs another batch; raises on every rank if only some have one."""
        if not self.active:
            return has_batch
        have, lack = self._sum([int(has_batch), int(not has_batch)])
        if have and lack:
            import torch.distributed as dist

            raise RuntimeError(
                f"Calibration batch {self.batch_index}: {have} rank(s) have it and {lack} do not (this rank "
                f"{dist.get_rank()}: {'has' if has_batch else 'has not'}). On a ZeRO-3/FSDP2-sharded model every "
                "forward is collective: give every rank the same number of calibration batches."
            )
        self.batch_index += 1
        return bool(have)

    def stop(self, local_stop: bool) -> bool:
        """True on every rank once any rank wants to stop (its `max_tokens` reached)."""
        if not self.active:
            return local_stop
        import torch.distributed as dist

        return bool(self._sum([int(local_stop)], dist.ReduceOp.MAX)[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine or a DistributedDataParallel wrapper: their forward runs it, and its
    layer names are the ones statistics are saved under (without the wrapper's 'module.' prefix)."""
    while type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel") and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA A/B, `modules_to_save`) whole, on CPU, for saving a sharded model's adapter.

    PEFT's `save_pretrained` reads `model.state_dict()`: under ZeRO-3 that holds 0-element placeholders, which it
    writes without an error (an adapter of empty tensors), and under FSDP2 it holds DTensor shards. Pass this
    instead: `model.save_pretrained(folder, state_dict=adapter_state_dict(model))`. Every rank must call it (the
    gather is collective); let one rank save.

    Args:
        model: A PeftModel, or a DeepSpeed engine / DDP wrapper around one.

    Returns:
        Parameter name → full tensor, for every trainable parameter and every LoRA factor.
    """
    model = unwrap(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or "lora_" in n]
    with full_tensors([p for _, p in named]) as values:
        return {n: v.detach().to("cpu", copy=True) for (n, _), v in zip(named, values)}


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of `model` back in its sharded state before Astra reads or writes its weights.

    After a forward (Astra's calibration included), FSDP2 leaves the root unit's parameters unsharded: plain
    tensors gathered from the DTensor shards, which the next reshard frees without copying back. Written there,
    Astra's A, B and residual would be silently lost at the first reshard (tested: the model fell back to PEFT's
    default A/B). Resharded, the parameters are the DTensors the optimizer steps and every all-gather reads.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
