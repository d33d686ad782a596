"""Saving a trained Astra adapter as a plain LoRA adapter of the ORIGINAL base model.

Astra rewrites the frozen weights (W ← W − s·B₀A₀), so its adapter only fits the residual base. PEFT converts
such adapters (PiSSA, OLoRA, CorDA) given the adapter saved right after initialisation: ΔW = BA − B₀A₀ becomes a
rank-2r LoRA, [A; A₀] and [B, −B₀]. PEFT 0.21's conversion keeps only the lora_A/lora_B tensors, though, so a
trained classification head (`modules_to_save`) or trained biases would silently revert to the base model's;
`save_as_lora` writes them back.
"""

from __future__ import annotations

import os
from pathlib import Path

from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file, save_file


def save_as_lora(model: PeftModel, path, initial_path, adapter_name: str = "default") -> Path:
    """Save `model`'s trained adapter to `path` as a plain LoRA adapter of the original base model.

    `initial_path` holds the adapter as saved right after `initialize_astra_weights` (`model.save_pretrained`).
    Loading `path` onto the untouched base model reproduces the trained model's outputs, heads included.
    """
    path = Path(path)
    model.save_pretrained(str(path), selected_adapters=[adapter_name],
                          path_initial_model_for_weight_conversion=str(initial_path))
    # save_pretrained puts a non-default adapter in a sub-folder named after it
    folder = path if adapter_name == "default" else path / adapter_name
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    converted = load_file(str(weights))
    trained = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = {k: v for k, v in trained.items() if "lora_" not in k and k not in converted}
    if missing:
        converted.update({k: v.detach().contiguous().cpu() for k, v in missing.items()})
        tmp = weights.with_name(weights.name + ".tmp")
        save_file(converted, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, weights)
    return folder
