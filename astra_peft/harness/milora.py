"""MiLoRA (Wang et al., 2024a), which PEFT lacks: LoRA initialised from W's minor singular components."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import lora_layers


@torch.no_grad()
def milora_init(model: nn.Module, adapter_name: str = "default") -> None:
    """MiLoRA (Wang et al., 2024a): the mirror of PEFT's `pissa_init`, with the r *smallest* singular triplets.

    W = U S Vᵀ; A = √S_r V_rᵀ, B = U_r √S_r with S_r divided by the LoRA scaling s, so that s·BA is exactly the
    minor part of W; the base keeps the rest, W ← W − s·BA, and the model's outputs do not move at init.
    """
    from peft.utils.other import transpose

    for layer in lora_layers(model, adapter_name).values():
        base = layer.get_base_layer()
        dtype = base.weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"MiLoRA needs a float32/float16/bfloat16 base weight, got {dtype}")
        weight = transpose(base.weight.to(torch.float32), layer.fan_in_fan_out)
        r = layer.r[adapter_name]
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # singular values in descending order
        Ur, Sr, Vhr = U[:, -r:], S[-r:] / layer.scaling[adapter_name], Vh[-r:]
        lora_A = torch.diag(torch.sqrt(Sr)) @ Vhr
        lora_B = Ur @ torch.diag(torch.sqrt(Sr))
        layer.lora_A[adapter_name].weight.data = lora_A.to(layer.lora_A[adapter_name].weight.dtype)
        layer.lora_B[adapter_name].weight.data = lora_B.to(layer.lora_B[adapter_name].weight.dtype)
        weight = weight - layer.scaling[adapter_name] * lora_B @ lora_A
        base.weight.data = transpose(weight.to(dtype), layer.fan_in_fan_out)
