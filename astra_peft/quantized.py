"""Astra with a 4-bit (bitsandbytes) base model, as in QLoRA.

Astra rewrites the frozen weight (W ← W − s·B·A), which a 4-bit weight cannot hold exactly, so
`initialize_astra_weights` refuses `Linear4bit` layers. Two supported routes instead:

* **Residual route** (QPiSSA-style, the one to use): initialise Astra on the full-precision model, then
  `quantize_astra_model` saves the residual base W − s·B·A and the initial adapter and reloads the residual
  in 4-bit with the adapter on it. At init the 4-bit model differs from the original only by the 4-bit
  rounding of the residual.
* **Native route** (`initialize_astra_on_quantized`, LoftQ-like): the 4-bit base of the ORIGINAL weights
  stays untouched; the statistics come from the quantized forward, B = Q and A = Qᵀ(W − deq(W₄))/s, so
  B·A absorbs the part of the quantization error that lies in Astra's subspace. The adapter starts near
  zero (it does not carry QᵀW as Astra's does), and the saved adapter is a plain LoRA of the 4-bit base.

`quantization_error` measures either against the full-precision model. `benchmarks/bench_qlora.py` compares
them with plain QLoRA, one-shot LoftQ and PEFT's QPiSSA: with Astra's default tail eigenvectors the residual
route's error is about plain QLoRA's (the tail part s·B·A it keeps in full precision is small); it drops to
QPiSSA's only with eigen_selection="largest" and lora_alpha = r (W − s·QQᵀW removes the principal output
directions at s = 1; at other s it keeps them, scaled by 1 − s). The native route is never worse than QLoRA,
layer by layer.

The native route's code lives in `_quantized_native.py` and the 4-bit layer helpers (`is_4bit`,
`dequantized_weight`, `base_weight`, `disable_cpu_weight_packing`) in `_bnb4bit.py`; both are re-exported here, so
every name above is imported from `astra_peft.quantized`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable, Optional

import torch
from peft import PeftModel
from torch import nn

from ._bnb4bit import _bnb, base_weight, dequantized_weight, disable_cpu_weight_packing, is_4bit
from ._quantized_native import initialize_astra_on_quantized
from .conversion import load_residual_adapter
from .layers import canonical_name, lora_layers

__all__ = [
    "ADAPTER_DIR",
    "MANIFEST",
    "RESIDUAL_DIR",
    "base_weight",
    "dequantized_weight",
    "disable_cpu_weight_packing",
    "effective_weight",
    "initialize_astra_on_quantized",
    "is_4bit",
    "load_on_quantized_base",
    "nf4_config",
    "quantization_error",
    "quantize_astra_model",
    "save_for_quantized_base",
]

RESIDUAL_DIR = "residual_base"
ADAPTER_DIR = "adapter"
MANIFEST = "astra_quantized.json"


def nf4_config(compute_dtype: torch.dtype = torch.float32, double_quant: bool = False,
               skip_modules: Optional[list] = None):
    """The QLoRA quantization: `BitsAndBytesConfig` for 4-bit NormalFloat weights.

    Args:
        compute_dtype: dtype of the matmuls (torch.bfloat16 on a GPU as in QLoRA; float32 on CPU).
        double_quant: also quantize the block scales (`bnb_4bit_use_double_quant`).
        skip_modules: modules kept in full precision (`llm_int8_skip_modules`), e.g. a classification head the
            adapter trains (`modules_to_save`); None keeps transformers' default (the output embedding).

    Returns:
        A `transformers.BitsAndBytesConfig`.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant, llm_int8_skip_modules=skip_modules)



# ------------------------------------------------------------------------------------------- residual route
def save_for_quantized_base(peft_model: PeftModel, output_dir, adapter_name: str = "default") -> Path:
    """Save an Astra-initialised model as a residual base plus its initial adapter, ready for 4-bit loading.

    Call right after `initialize_astra_weights` on the full-precision model. Writes `output_dir/residual_base`
    (the base model whose target weights are the residual W − s·B·A, an ordinary transformers checkpoint),
    `output_dir/adapter` (the adapter as initialised; keep it: `save_as_lora(..., initial_path=...)` needs it to
    convert the trained adapter for the original base) and `output_dir/astra_quantized.json`.

    Args:
        peft_model: the full-precision PeftModel that `initialize_astra_weights` initialised.
        output_dir: a new or empty folder.
        adapter_name: the adapter to save.

    Returns:
        `output_dir` as a Path.

    Raises:
        ValueError: if the adapter was not initialised by Astra (its base is the original model: quantize that
            directly), or `output_dir` is a non-empty folder (nothing is overwritten).
    """
    layers = lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"No LoRA layer of adapter '{adapter_name}' was found in the model.")
    plain = [name for name, layer in layers.items() if adapter_name not in getattr(layer, "astra_adapters", ())]
    if plain:
        raise ValueError(
            f"Layer '{plain[0]}' of adapter '{adapter_name}' was not initialised by Astra, so its base is not a "
            "residual: run initialize_astra_weights on the full-precision model first (or, for plain QLoRA, "
            "load the original model in 4-bit directly)."
        )
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{output_dir} is not empty; give a new or empty folder (nothing is overwritten).")
    base = peft_model.get_base_model()
    state = _residual_state_dict(base)
    peft_model.save_pretrained(str(output_dir / ADAPTER_DIR), selected_adapters=[adapter_name])
    base.save_pretrained(str(output_dir / RESIDUAL_DIR), state_dict=state)
    adapter_folder = ADAPTER_DIR if adapter_name == "default" else f"{ADAPTER_DIR}/{adapter_name}"
    manifest = {"residual_base": RESIDUAL_DIR, "adapter": adapter_folder, "adapter_name": adapter_name,
                "note": "Astra residual base (W - s*B*A): load with astra_peft.quantized.load_on_quantized_base"}
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return output_dir


def _residual_state_dict(base: nn.Module) -> dict:
    """The base model's own state dict (the residual weights) under its plain names, without LoRA tensors."""
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[key] = value
    # Why check: a PEFT wrapper this mapping does not know would give a checkpoint that loads with
    # missing (randomly initialised) weights; refuse instead.
    with torch.device("meta"):
        expected = set(type(base)(copy.deepcopy(base.config)).state_dict())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise ValueError(
            f"Cannot write the residual base: its parameter names differ from a plain {type(base).__name__} "
            f"(e.g. '{odd[0]}'). Only LoRA layers (and modules_to_save) are supported on this route."
        )
    return state


def load_on_quantized_base(
    output_dir,
    quantization_config=None,
    *,
    is_trainable: bool = True,
    model_class=None,
    **from_pretrained_kwargs,
) -> PeftModel:
    """Load what `save_for_quantized_base` wrote: the residual base in 4-bit, with the initial adapter on it.

    Args:
        output_dir: the folder `save_for_quantized_base` wrote.
        quantization_config: a 4-bit `BitsAndBytesConfig`; default `nf4_config()` (nf4, float32 compute).
        is_trainable: load the adapter trainable (False for inference).
        model_class: the transformers class of the base; default the one named in its config.json.
        **from_pretrained_kwargs: passed to `model_class.from_pretrained` (e.g. `device_map`, `dtype`).

    Returns:
        The PeftModel on the 4-bit residual base, CPU weight packing switched off (`disable_cpu_weight_packing`).
        For training, PEFT's `prepare_model_for_kbit_training` applies as for any QLoRA model.

    Raises:
        FileNotFoundError: if a part of the saved layout is missing.
        ValueError: if `quantization_config` is not 4-bit bitsandbytes, or the checkpoint loads with missing or
            unexpected weights.
    """
    _bnb()
    output_dir = Path(output_dir)
    manifest_path = output_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: {output_dir} was not written by save_for_quantized_base.")
    manifest = json.loads(manifest_path.read_text())
    residual_dir, adapter_dir = output_dir / manifest["residual_base"], output_dir / manifest["adapter"]
    for path in (residual_dir / "config.json", adapter_dir / "adapter_config.json"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the saved residual base or adapter is incomplete.")
    quantization_config = quantization_config if quantization_config is not None else nf4_config()
    if not getattr(quantization_config, "load_in_4bit", False):
        raise ValueError(
            "quantization_config must be a 4-bit bitsandbytes config (BitsAndBytesConfig(load_in_4bit=True, ...), "
            "see nf4_config()); other quantizations are not tested with Astra."
        )
    # Why: a trained head (modules_to_save) is copied from the base layer; a 4-bit one cannot train (PEFT fails
    # with "only Tensors of floating point dtype can require gradients" or trains a uint8 copy).
    saved = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save") or []
    skipped = set(getattr(quantization_config, "llm_int8_skip_modules", None) or [])
    if set(saved) - skipped:
        raise ValueError(
            f"The adapter trains {sorted(saved)} in full precision (modules_to_save): keep them out of 4-bit with "
            f"nf4_config(skip_modules={sorted(set(saved) | skipped)!r}) (add 'lm_head' for a causal LM), or "
            "BitsAndBytesConfig(llm_int8_skip_modules=[...])."
        )
    if model_class is None:
        import transformers

        config = json.loads((residual_dir / "config.json").read_text())
        arch = (config.get("architectures") or [None])[0]
        if arch is None or not hasattr(transformers, arch):
            raise ValueError(f"{residual_dir}/config.json names no transformers architecture: pass model_class.")
        model_class = getattr(transformers, arch)
    base, info = model_class.from_pretrained(
        str(residual_dir), quantization_config=quantization_config, output_loading_info=True, **from_pretrained_kwargs
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"The residual base in {residual_dir} did not load cleanly: {bad}.")
    model = load_residual_adapter(base, adapter_dir, manifest["adapter_name"], is_trainable=is_trainable)
    disable_cpu_weight_packing(model)
    return model


def quantize_astra_model(peft_model: PeftModel, output_dir, quantization_config=None, *,
                         adapter_name: str = "default", **load_kwargs) -> PeftModel:
    """The residual route in one call: `save_for_quantized_base`, then `load_on_quantized_base`.

    Args:
        peft_model: the full-precision PeftModel right after `initialize_astra_weights` (left unchanged).
        output_dir: a new or empty folder for the residual base and the initial adapter.
        quantization_config: a 4-bit `BitsAndBytesConfig`; default `nf4_config()`.
        adapter_name: the adapter to carry over.
        **load_kwargs: passed to `load_on_quantized_base`.

    Returns:
        The trainable PeftModel on the 4-bit residual base.

    Raises:
        ValueError: as `save_for_quantized_base` and `load_on_quantized_base`.
    """
    save_for_quantized_base(peft_model, output_dir, adapter_name)
    return load_on_quantized_base(output_dir, quantization_config, **load_kwargs)


# ------------------------------------------------------------------------------------------------ measuring
def effective_weight(layer, adapter_name: str = "default") -> torch.Tensor:
    """What a LoRA layer (or a plain / 4-bit linear layer) computes with: deq(base) + s·B·A, float32."""
    if adapter_name not in getattr(layer, "lora_A", {}):
        return base_weight(layer)
    w = base_weight(layer.get_base_layer())
    b = layer.lora_B[adapter_name].weight.detach().to(torch.float32)
    a = layer.lora_A[adapter_name].weight.detach().to(torch.float32)
    return w + layer.scaling[adapter_name] * (b @ a).to(w.device)


def quantization_error(model: nn.Module, reference: nn.Module, batches: Iterable, adapter_name: str = "default") -> dict:
    """How far a (4-bit) model is from a full-precision reference: logits and per-layer effective weights.

    Args:
        model: the model to measure (e.g. from `quantize_astra_model`); CPU packing is switched off on it.
        reference: the full-precision model (plain, or a PeftModel whose adapters count).
        batches: dicts for `model(**batch)`; positions with `attention_mask == 0` are left out of per-token
            logits (a sequence classifier's logits count whole).
        adapter_name: the adapter whose LoRA layers are compared (the same names in both models).

    Returns:
        {"max_abs_logits", "mean_abs_logits", "layers": {name: ‖W_eff − W_ref‖_F / ‖W_ref‖_F}}.
    """
    disable_cpu_weight_packing(model)
    # A PeftModel's LoRA layer and its base_layer share a canonical name: the LoRA layer (adapter included) counts.
    ref_modules = {**{canonical_name(n): m for n, m in reference.named_modules()}, **lora_layers(reference, adapter_name)}
    layers = {name: float((effective_weight(layer, adapter_name) - effective_weight(ref_modules[name], adapter_name))
                          .norm() / effective_weight(ref_modules[name], adapter_name).norm())
              for name, layer in lora_layers(model, adapter_name).items()}
    worst, total, count = 0.0, 0.0, 0
    modes = [(m, m.training) for m in (*model.modules(), *reference.modules())]
    model.eval(), reference.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                diff = (model(**batch).logits.float() - reference(**batch).logits.float()).abs()
                mask = batch.get("attention_mask")
                per_token = mask is not None and diff.dim() == 3 and diff.shape[:2] == mask.shape
                diff = diff[mask.bool()] if per_token else diff.reshape(-1)  # (a classifier: one row per sequence)
                worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
    finally:
        for module, mode in modes:
            module.training = mode
    return {"max_abs_logits": worst, "mean_abs_logits": total / max(count, 1), "layers": layers}
