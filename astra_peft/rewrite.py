"""The one place the frozen base weight is rewritten: W ← W − s·B·A.

Astra (and PiSSA, OLoRA, CorDA, LoRA-GA, MiLoRA) start the adapter at a non-zero B·A and take it out of the
frozen weight, so that the adapted model's outputs do not move at initialisation. Writing that residual
is done here and nowhere else, in one layout convention (W as (d_out, d_in), `layers.weight_matrix`), so
that a method that forms it and a harness that rebuilds it from a saved adapter (resuming a run) round it
the same way and agree bit for bit.
"""

from __future__ import annotations

import torch
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .config import ResidualOrder
from .layers import lora_layers, set_weight_matrix, weight_matrix


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
def subtract_adapter(layer, adapter_name: str = "default", order: ResidualOrder = "product", *,
                     gather: bool = True) -> None:
    """W ← W − s·B·A on one LoRA layer's frozen base, from the adapter's current A and B.

    The residual is formed in float32 and cast once to the base weight's dtype, so base + s·B·A gives back
    W as closely as that dtype allows.

    Args:
        layer: A PEFT `LoraLayer` whose base is an `nn.Linear` or a transformers `Conv1D`.
        adapter_name: Which adapter's A and B to take out of the base.
        order: See `residual_weight`.
        gather: Gather ZeRO-3-partitioned weights around the write. Pass False when the caller already holds
            them gathered (nesting DeepSpeed's gathering would re-partition them under the caller).

    Raises:
        KeyError: The layer has no adapter `adapter_name`.
    """
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    scaling = layer.scaling[adapter_name]
    if not gather:
        set_weight_matrix(base, residual_weight(weight_matrix(base).detach(), lora_a, lora_b, scaling, order))
        return
    with gather_params_ctx([base.weight, lora_a, lora_b], modifier_rank=0):
        set_weight_matrix(base, residual_weight(weight_matrix(base).detach(), lora_a, lora_b, scaling, order))


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
    for layer in layers.values():
        subtract_adapter(layer, adapter_name, order)
    return len(layers)
