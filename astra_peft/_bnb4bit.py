"""The bitsandbytes 4-bit layer as both quantized routes see it: detect one, read the weight it computes with, and
keep it trainable on CPU (`disable_cpu_weight_packing`). Re-exported by `astra_peft.quantized`: import from there.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import weight_matrix


def _bnb():
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "A 4-bit base needs bitsandbytes: pip install 'astra-peft[integrations]' (or bitsandbytes)."
        ) from err
    return bitsandbytes


def is_4bit(layer: nn.Module) -> bool:
    """Whether `layer` is a bitsandbytes 4-bit linear layer (not PEFT's LoRA wrapper around one)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(layer, bnb.nn.Linear4bit)


def disable_cpu_weight_packing(model: nn.Module) -> int:
    """Keep every 4-bit layer of `model` in bitsandbytes' standard layout, so training backpropagates.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a `Linear4bit` weight at its first forward in eval
    mode without gradients, permanently, and computes it with a bf16 kernel. After that, a training forward
    calls a kernel without autograd support: no gradient reaches the layers before it (PyTorch only warns),
    and `bnb.functional.dequantize_4bit` (PEFT's merge) reads the packed bytes as garbage. This undoes any
    packing already done and switches it off on every 4-bit layer (forward then dequantizes to the compute
    dtype, as on GPU). Packing also rounds the block scales to bfloat16 (≤ 2⁻⁹ relative), which unpacking cannot
    undo: call this before the first forward (the loaders in this module do).

    Args:
        model: any model; layers that are not bitsandbytes `Linear4bit` are left alone.

    Returns:
        The number of 4-bit layers seen.
    """
    count = 0
    for module in model.modules():
        if is_4bit(module):
            _unpack(module)
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _unpack(layer: nn.Module) -> None:
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        state = weight.quant_state
        if not state.nested and state.absmax.dtype != torch.float32:  # the packing left the scales in bf16
            state.absmax = state.absmax.to(torch.float32)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) float32 weight a bitsandbytes `Linear4bit` layer computes with.

    Args:
        layer: a bitsandbytes `Linear4bit` (a CPU-packed one is unpacked first, see
            `disable_cpu_weight_packing`).

    Returns:
        The dequantized weight, float32.

    Raises:
        TypeError: if `layer` is not a bitsandbytes 4-bit layer.
    """
    if not is_4bit(layer):
        raise TypeError(f"Expected a bitsandbytes Linear4bit layer, got {type(layer).__name__}.")
    _unpack(layer)
    deq = _bnb().functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return deq.to(torch.float32).reshape(layer.out_features, layer.in_features)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) float32 weight a (possibly 4-bit) base layer computes with."""
    return dequantized_weight(layer) if is_4bit(layer) else weight_matrix(layer).detach().to(torch.float32)
