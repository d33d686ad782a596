"""Which layers Astra touches, their weights as (d_out, d_in) views, and their fingerprints."""

from __future__ import annotations

import contextlib
import copy
import hashlib

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .sharding import full_tensors, is_dtensor, is_flat, is_zero3, logical_shape

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)
_PEFT_PREFIX = "base_model.model."
_DIGEST_SAMPLES = 4096


def canonical_name(name: str) -> str:
    """The layer's name in the plain base model, so stats from a base model fit any PeftModel of it."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    if name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def lora_layers(model: nn.Module, adapter_name: str) -> dict[str, LoraLayer]:
    """The LoRA layers of `adapter_name`, keyed by canonical name."""
    return {
        canonical_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    }


def target_base_layers(model: nn.Module, lora_config=None, adapter_name: str = "default") -> dict[str, nn.Module]:
    """The frozen linear layers an adapter targets, keyed by canonical name.

    On a model that already holds LoRA layers for `adapter_name`, those layers decide; on a plain model,
    PEFT's own matching of `lora_config.target_modules` does, so both agree on the same set.
    """
    wrapped = lora_layers(model, adapter_name)
    if wrapped:
        return {name: layer.get_base_layer() for name, layer in wrapped.items()}
    if lora_config is None:
        raise ValueError("The model has no LoRA layers; pass the LoraConfig whose target_modules to calibrate.")
    config = _maybe_include_all_linear_layers(copy.copy(lora_config), model)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) or not name:
            continue
        if check_target_module_exists(config, name) and isinstance(module, SUPPORTED_BASE_LAYERS):
            found[canonical_name(name)] = module
    return found


def check_supported(name: str, layer: nn.Module) -> None:
    """Raise for base layers whose weight Astra cannot read and rewrite exactly (quantized, other types)."""
    if type(layer) not in SUPPORTED_BASE_LAYERS:
        raise TypeError(
            f"Layer '{name}' is a {type(layer).__module__}.{type(layer).__name__}; Astra supports "
            "torch.nn.Linear and transformers Conv1D base layers (quantized layers are not supported: "
            "Astra rewrites the frozen weight W ← W − s·B·A, which a quantized weight cannot hold exactly). "
            "For a 4-bit (QLoRA) base, initialise Astra on the full-precision model and reload its residual "
            "in 4-bit with astra_peft.quantized.quantize_astra_model, or keep the 4-bit base untouched with "
            "astra_peft.quantized.initialize_astra_on_quantized."
        )
    if not layer.weight.dtype.is_floating_point:
        raise TypeError(f"Layer '{name}' has a {layer.weight.dtype} weight; Astra needs a floating-point weight.")
    if layer.weight.is_meta:  # accelerate's disk/CPU offload (device_map + offload_folder) or init_empty_weights
        raise TypeError(
            f"Layer '{name}' has its weight on the meta device (offloaded by a device_map with offload_folder, or "
            "never loaded): Astra reads W and rewrites it in place. Load the model without offloading "
            "(device_map=None or every module on one device), initialise, then save it or offload it."
        )
    # A weight that is not the layer's full (d_out, d_in) matrix is a view some wrapper made of it (FSDP1's flat
    # parameters, a wrapper's empty placeholder): reading it would fail deep inside torch, or silently mislead.
    shape = logical_shape(layer.weight)
    expected = out_in_dims(layer)[::-1] if isinstance(layer, Conv1D) else out_in_dims(layer)
    if is_flat(layer.weight) or shape != tuple(expected):
        raise TypeError(
            f"Layer '{name}' holds a weight of shape {shape} where its {tuple(expected)} matrix should be: it is "
            "sharded or flattened by a wrapper Astra cannot read (FSDP1 flat parameters, or a model that another "
            "framework already partitioned). Initialise Astra before wrapping/sharding the model; DeepSpeed ZeRO-3 "
            "and FSDP2 (fully_shard) are supported."
        )


def out_in_dims(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, LoraLayer):
        layer = layer.get_base_layer()
    if isinstance(layer, Conv1D):
        return layer.nf, logical_shape(layer.weight)[0]
    return layer.out_features, layer.in_features


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """W as (d_out, d_in), whatever the layer stores: Conv1D (GPT-2) keeps Wᵀ. Unsharded weights only: see
    `full_weight` for ZeRO-3 partitions and FSDP2 DTensors."""
    _refuse_sharded(layer)
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def set_weight_matrix(layer: nn.Module, w: torch.Tensor) -> None:
    _refuse_sharded(layer)
    w = w.T if isinstance(layer, Conv1D) else w
    layer.weight.data.copy_(w.to(layer.weight.dtype))


def _refuse_sharded(layer: nn.Module) -> None:
    # A ZeRO-3 placeholder reads as an empty tensor and a DTensor as one rank's shard: either would fail later
    # with an unrelated-looking error, or compute from the wrong numbers.
    w = layer.weight
    if is_dtensor(w) or (is_zero3(w) and w.ds_status.name == "NOT_AVAILABLE"):
        kind = "an FSDP2 DTensor" if is_dtensor(w) else "a ZeRO-3 partition"
        raise TypeError(
            f"This {type(layer).__name__}'s weight (shape {logical_shape(w)}) is {kind}: read it whole with "
            "astra_peft.layers.full_weight(layer) and write it with astra_peft.sharding.assign."
        )


@contextlib.contextmanager
def full_weight(layer: nn.Module):
    """Yield (W as (d_out, d_in), bias or None), whole even where ZeRO-3 or FSDP2 shards them; read only."""
    with full_tensors([layer.weight, getattr(layer, "bias", None)]) as (w, bias):
        yield (w.T if isinstance(layer, Conv1D) else w), bias


def layer_digest(layer: nn.Module) -> str:
    """A cheap fingerprint of a layer's weights.

    Evenly spaced samples rounded to bfloat16, so an fp32 model and its bf16 copy share a digest while
    another model, or this model after Astra rewrote its weights, does not.
    """
    with full_weight(layer) as (w, _):
        flat = w.reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(_DIGEST_SAMPLES, flat.numel()), device=flat.device).long()
        sample = flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    d_out, d_in = out_in_dims(layer)
    return hashlib.sha256(f"{d_out}x{d_in}".encode() + sample).hexdigest()[:16]
