"""The native route of `astra_peft.quantized`: Astra's subspace on an untouched 4-bit base (LoftQ-like).

The route itself is described in `astra_peft.quantized`'s module docstring, beside the residual route; it lives in
its own module because the two share nothing but the 4-bit layer helpers (`_bnb4bit`). Re-exported by
`astra_peft.quantized` (and lazily by `astra_peft`): import it from there.
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ._adapter_checks import check_base_as_loaded, check_materialised
from ._bnb4bit import dequantized_weight, disable_cpu_weight_packing, is_4bit
from .calibration import ForwardFn
from .config import AstraConfig
from .initialization import AstraReport, initialize_astra_weights
from .layers import canonical_name, lora_layers, out_in_dims

# nf4 rounding moves a weight by ~10 % (relative Frobenius); far beyond that, the "original" model given to
# the native route is not the one the 4-bit model was quantized from.
_MISMATCH_RTOL = 0.5


def initialize_astra_on_quantized(
    peft_model: PeftModel,
    original_model: nn.Module,
    dataloader: Iterable,
    astra_config: Optional[AstraConfig] = None,
    *,
    forward_fn: Optional[ForwardFn] = None,
    adapter_name: str = "default",
) -> AstraReport:
    """Astra's subspace on an untouched 4-bit base, the adapter absorbing part of the quantization error.

    For each target layer: Q = Astra's eigenvectors from the statistics of the QUANTIZED forward (calibrated
    on a full-precision copy of `original_model` holding the dequantized weights, which computes exactly what
    the 4-bit model computes in float32), then B = Q and A = Qᵀ(W − deq(W₄))/s. The base stays the original
    4-bit weights; the layer computes deq(W₄) + Q·Qᵀ(W − deq(W₄)), whose error (I − QQᵀ)(W − deq(W₄)) is, for
    every input, no larger than plain QLoRA's. Unlike Astra, A does not start at QᵀW; the saved adapter is a
    plain LoRA of the original 4-bit base (no residual to keep). Holds one extra full-precision copy of the
    model during the call. Every check runs before the adapter is written.

    Args:
        peft_model: a PeftModel whose base was loaded in 4-bit (bitsandbytes) from `original_model`'s weights.
        original_model: the plain full-precision model it was quantized from (read, never modified).
        dataloader: calibration batches, as for `initialize_astra_weights`.
        astra_config: the Astra choices (eigenvector selection, statistic, ...).
        forward_fn: how to run a batch, as for `initialize_astra_weights`.
        adapter_name: the adapter to initialise.

    Returns:
        The `AstraReport` of the eigenvector selection.

    Raises:
        TypeError: if a target layer's base is not a bitsandbytes 4-bit layer (use `initialize_astra_weights`
            on a full-precision base).
        ValueError: if `original_model` is a PeftModel or does not match the quantized model (a layer missing,
            another shape, or weights farther from the dequantized ones than 4-bit rounding explains), or as
            `initialize_astra_weights`.
    """
    layers = lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"No LoRA layer of adapter '{adapter_name}' was found in the model.")
    if isinstance(original_model, PeftModel) or lora_layers(original_model, adapter_name):
        raise ValueError("original_model must be the plain full-precision model, not a PeftModel.")
    # The shadow below is made with init_lora_weights=True and checks everything else (variants, shared weights);
    # the 4-bit model's own adapters must not have rewritten its base either.
    check_base_as_loaded(peft_model, adapter_name)
    for name, layer in layers.items():
        check_materialised(name, layer, adapter_name)  # factors copied into a meta adapter would be lost
        base = layer.get_base_layer()
        if not is_4bit(base):
            raise TypeError(
                f"Layer '{name}' is a {type(base).__name__}, not a bitsandbytes 4-bit layer: this route is for a "
                "4-bit base; on a full-precision base use initialize_astra_weights."
            )
    shadow = copy.deepcopy(original_model)
    shadow_modules = {canonical_name(n): m for n, m in shadow.named_modules()}
    originals = {}
    for name, module in peft_model.named_modules():
        if not is_4bit(module):
            continue
        name = canonical_name(name)
        target = shadow_modules.get(name)
        if not isinstance(target, nn.Linear) or out_in_dims(target) != (module.out_features, module.in_features):
            raise ValueError(f"original_model has no {module.out_features}x{module.in_features} nn.Linear "
                             f"'{name}' matching the quantized layer: pass the model it was quantized from.")
        w, deq = target.weight.detach().to(torch.float32).clone(), dequantized_weight(module)
        rel = float((deq - w).norm() / w.norm().clamp_min(1e-30))
        if rel > _MISMATCH_RTOL:
            raise ValueError(f"Layer '{name}': the quantized weight is {rel:.2f} (relative) away from original_model's, "
                             "far beyond 4-bit rounding: pass the model it was quantized from.")
        target.weight.data.copy_(deq.to(target.weight.dtype))
        originals[name] = (w, deq)
    shadow_config = copy.deepcopy(peft_model.peft_config[adapter_name])
    shadow_config.init_lora_weights = True
    shadow_config.inference_mode = False
    shadow_config.base_model_name_or_path = shadow.__dict__.get("name_or_path") or None  # (else PEFT warns)
    shadow_peft = get_peft_model(shadow, shadow_config)
    report = initialize_astra_weights(shadow_peft, dataloader, astra_config, forward_fn=forward_fn)
    factors = {}
    for name, shadow_layer in lora_layers(shadow_peft, "default").items():
        q = shadow_layer.lora_B["default"].weight.detach().to(torch.float32)
        w, deq = originals[name]
        factors[name] = (q.T @ (w - deq) / layers[name].scaling[adapter_name], q)
    del shadow_peft, shadow
    for name, (a, b) in factors.items():
        lora_a, lora_b = layers[name].lora_A[adapter_name].weight, layers[name].lora_B[adapter_name].weight
        lora_a.data.copy_(a.to(device=lora_a.device, dtype=lora_a.dtype))
        lora_b.data.copy_(b.to(device=lora_b.device, dtype=lora_b.dtype))
    disable_cpu_weight_packing(peft_model)
    return report
