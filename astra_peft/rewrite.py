"""The one place the frozen base weight is rewritten: W ← W − s·B·A.

Astra (and PiSSA, OLoRA, CorDA, LoRA-GA, MiLoRA) start the adapter at a non-zero B·A and take it out of the
frozen weight, so that the adapted model's outputs do not move at initialisation. The residual is formed
here and nowhere else (`residual_weight`: `initialize_astra_weights`, MiLoRA and the harness's resume all call
it), in one layout convention (W as (d_out, d_in); Conv1D stores Wᵀ), so that a method that forms it and a
harness that rebuilds it from a saved adapter (resuming a run) round it the same way and agree bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ResidualOrder
from .layers import lora_layers
from .sharding import assign, full_tensors


def residual_weight(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, order: ResidualOrder = "product"
) -> torch.Tensor:
    """W − s·B·A in float32, from A and B exactly as the adapter holds them.

    Args:
        w: The base weight as (d_out, d_in), any floating dtype.
        a: LoRA A, (r, d_in), as stored in the adapter (already cast to its dtype).
        b: LoRA B, (d_out, r), as stored in the adapter.
        scaling: The adapter's scaling s (α/r, or α/√r with rsLoRA).
        order: Where the float32 rounding falls: "product" forms s·(B@A), "scaled_b" forms (s·B)@A. Both are
            W − s·BA; the order only matters to reproduce, bit for bit, a residual some code formed before.

    Returns:
        The residual as a float32 (d_out, d_in) tensor on `w`'s device.

    Raises:
        ValueError: `order` is not one of the `ResidualOrder` values.
    """
    w = w.to(torch.float32)
    a = a.to(device=w.device, dtype=torch.float32)
    b = b.to(device=w.device, dtype=torch.float32)
    if order == "product":
        delta = scaling * (b @ a)
    elif order == "scaled_b":
        delta = (scaling * b) @ a
    else:
        raise ValueError(f"order must be 'product' or 'scaled_b', got {order!r}")
    return w - delta


@torch.no_grad()
def subtract_adapter(layer, adapter_name: str = "default", order: ResidualOrder = "product", *, name: str = "") -> None:
    """W ← W − s·B·A on one LoRA layer's frozen base, from the adapter's current A and B.

    The residual is formed in float32 and cast once to the base weight's dtype, so base + s·B·A gives back W as
    closely as that dtype allows. W, A and B are read whole and the result written through
    `sharding.assign`, as `initialize_astra_weights` writes its own, so ZeRO-3 partitions and FSDP2 shards
    hold the result too.

    Args:
        layer: A PEFT `LoraLayer` whose base is an `nn.Linear` or a transformers `Conv1D`.
        adapter_name: Which adapter's A and B to take out of the base.
        order: See `residual_weight`.
        name: The layer's name, for error messages.

    Raises:
        KeyError: The layer has no adapter `adapter_name`.
        RuntimeError: From `sharding.assign`: the weight cannot be written where training reads it.
    """
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    conv1d = isinstance(base, Conv1D)  # stores Wᵀ
    with full_tensors([base.weight, lora_a, lora_b]) as (w, a, b):
        residual = residual_weight(w.T if conv1d else w, a, b, layer.scaling[adapter_name], order)
    assign(name, [(base.weight, residual.T if conv1d else residual)])


def subtract_adapters(model: nn.Module, adapter_name: str = "default", order: ResidualOrder = "product") -> int:
    """`subtract_adapter` on every LoRA layer of `adapter_name` in `model`.

    Args:
        model: A PeftModel (or any module holding PEFT LoRA layers).
        adapter_name: The adapter to take out of the frozen weights.
        order: See `residual_weight`.

    Returns:
        How many layers were rewritten.
    """
    layers = lora_layers(model, adapter_name)
    for name, layer in layers.items():
        subtract_adapter(layer, adapter_name, order, name=name)
    return len(layers)
