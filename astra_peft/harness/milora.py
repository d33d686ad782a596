"""MiLoRA (Wang et al., 2024a), which PEFT lacks: LoRA initialised from W's minor singular components."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import lora_layers, weight_matrix
from ..rewrite import subtract_adapter


@torch.no_grad()
def milora_init(model: nn.Module, adapter_name: str = "default") -> None:
    """MiLoRA (Wang et al., 2024a): the mirror of PEFT's `pissa_init`, with the r *smallest* singular triplets.

    W = U S Vᵀ; A = √S_r V_rᵀ, B = U_r √S_r with S_r divided by the LoRA scaling s, so that s·BA is exactly the
    minor part of W; the base keeps the rest, W ← W − (s·B)A as PiSSA forms it, and the model's outputs do not
    move at init.

    Args:
        model: A PeftModel whose LoRA layers of `adapter_name` sit on nn.Linear or Conv1D bases.
        adapter_name: The adapter to initialise.

    Raises:
        TypeError: A base weight is not float32, float16 or bfloat16 (checked before anything is written).
    """
    layers = lora_layers(model, adapter_name)
    for name, layer in layers.items():  # every check before the first write: a failure leaves the model as it was
        dtype = layer.get_base_layer().weight.dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"Layer '{name}': MiLoRA needs a float32/float16/bfloat16 base weight, got {dtype}")
    for layer in layers.values():
        weight = weight_matrix(layer.get_base_layer()).to(torch.float32)
        r = layer.r[adapter_name]
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)  # singular values in descending order
        Ur, Sr, Vhr = U[:, -r:], S[-r:] / layer.scaling[adapter_name], Vh[-r:]
        lora_A = torch.diag(torch.sqrt(Sr)) @ Vhr
        lora_B = Ur @ torch.diag(torch.sqrt(Sr))
        layer.lora_A[adapter_name].weight.data = lora_A.to(layer.lora_A[adapter_name].weight.dtype)
        layer.lora_B[adapter_name].weight.data = lora_B.to(layer.lora_B[adapter_name].weight.dtype)
        del weight, U, S, Vh
        subtract_adapter(layer, adapter_name, "scaled_b")
