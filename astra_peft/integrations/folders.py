"""What a Trainer run with Astra writes next to its adapters, and how an initialisation is restored from it.

Astra's trained adapter fits only the residual base W − s·B₀A₀. Every folder the Trainer writes after
`initialize_astra_for_trainer` therefore carries an `astra/` folder:

    checkpoint-N/                     Trainer's checkpoint; its adapter is the RESIDUAL form (what resuming loads),
      adapter_config.json             with `"init_lora_weights": "astra"`: PEFT refuses to load it onto a plain base
      adapter_model.safetensors
      astra/lora/                     the same trained model as a rank-2r plain LoRA of the ORIGINAL base
      astra/initial/                  the adapter right after initialisation (A₀, B₀): rebuilds the residual base
      astra/astra.json                what is where, the initialisation's hash, the base model's fingerprint

    save_model(out)/                  a finished model: the top level is the plain LoRA of the ORIGINAL base
      adapter_config.json             (`PeftModel.from_pretrained(original_base, out)` just works)
      adapter_model.safetensors
      astra/residual/                 the residual-form adapter (marked "astra", as above)
      astra/initial/, astra/lora/, astra/astra.json

The initial adapter is saved once per run, in `<output_dir>/astra_init/`, and copied into each folder so that a
checkpoint stays usable after the run folder around it is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from .._adapter_checks import ASTRA_MARKER  # `init_lora_weights` of an adapter needing the residual base
from .._io import atomic_dir, atomic_path, write_json_atomic
from ..conversion import adapter_files, convert_saved_adapter, copy_adapter
from ..layers import layer_digest, lora_layers
from ..rewrite import subtract_adapter

INIT_DIR = "astra_init"  # under the Trainer's output_dir
EXTRA_DIR = "astra"  # inside each checkpoint / saved folder
MANIFEST = "astra.json"
FORMAT = "astra-peft-trainer/1"
_LORA_SETTINGS = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
                  "fan_in_fan_out", "modules_to_save", "bias")


def tensors_sha256(tensors: dict) -> str:
    """A hash of a state dict's exact values (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_fingerprint(peft_model, adapter_name: str = "default") -> str:
    """A fingerprint of the frozen weights under the adapter's LoRA layers (call it on the original base)."""
    digest = hashlib.sha256()
    for name, layer in sorted(lora_layers(peft_model, adapter_name).items()):
        digest.update(f"{name}:{layer_digest(layer.get_base_layer())};".encode())
    return digest.hexdigest()[:32]


def lora_settings(config) -> dict:
    """The LoRA settings an initial adapter must share with the model it is restored into."""
    values = config if isinstance(config, dict) else config.to_dict()
    out = {}
    for key in _LORA_SETTINGS:
        value = values.get(key)
        out[key] = sorted(value) if isinstance(value, (set, list, tuple)) else value
    return out


def read_manifest(folder) -> Optional[dict]:
    """The astra.json in `folder` (a folder this module wrote), or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an astra-peft Trainer manifest (format {manifest.get('format')!r}).")
    return manifest


def write_json(path: Path, payload: dict) -> None:
    write_json_atomic(path, payload)  # the project's one atomic-write helper (astra_peft/_io.py)


def check_ours(folder: Path) -> None:
    """Refuse to replace a folder this module did not write (it may be the user's)."""
    if folder.exists() and read_manifest(folder) is None:
        raise FileExistsError(
            f"{folder} exists and was not written by astra-peft (no {MANIFEST}); it is left alone. Move it away "
            "or use another output folder."
        )


@contextlib.contextmanager
def our_dir(dest: Path):
    """Yield a temporary folder that becomes `dest` when the block finishes, replacing an earlier one of ours
    (`dest` that is not ours is refused first); on failure `dest` is left as it was."""
    check_ours(dest)
    with atomic_dir(dest) as stage:
        yield stage


def mark_residual(folder: Path) -> None:
    """Make sure the residual-form adapter in `folder` says it needs the Astra residual base."""
    config_file, _ = adapter_files(folder)
    config = json.loads(config_file.read_text())
    if config.get("init_lora_weights") != ASTRA_MARKER:
        config["init_lora_weights"] = ASTRA_MARKER
        write_json(config_file, config)


def write_extras(folder, initial_dir, manifest: dict, *, saved_model: bool) -> Path:
    """Add `astra/` to a folder the Trainer just wrote (see the module docstring for the layout).

    Args:
        folder: A checkpoint or a `save_model` folder holding the trained residual-form adapter at its top.
        initial_dir: `<output_dir>/astra_init`, the adapter right after initialisation.
        manifest: The run's manifest (init hash, base fingerprint, adapter name); completed here.
        saved_model: True for `save_model` folders: the plain LoRA then also takes the top level.

    Returns:
        The `astra/` folder.

    Raises:
        FileExistsError: `folder/astra` exists and is not ours.
    """
    folder = Path(folder)
    extras = folder / EXTRA_DIR
    check_ours(extras)
    mark_residual(folder)
    with our_dir(extras) as stage:
        convert_saved_adapter(folder, initial_dir, stage / "lora")
        copy_adapter(initial_dir, stage / "initial")
        if saved_model:
            copy_adapter(folder, stage / "residual")
        paths = {"lora": f"{EXTRA_DIR}/lora", "initial": f"{EXTRA_DIR}/initial",
                 "residual": f"{EXTRA_DIR}/residual" if saved_model else "."}
        write_json(stage / MANIFEST, {
            **manifest, "format": FORMAT, "kind": "saved_model" if saved_model else "checkpoint",
            "top_level": "lora" if saved_model else "residual", "paths": paths,
            "how_to_load": (
                "On the original base model: PeftModel.from_pretrained(base, <this folder>/" +
                ("" if saved_model else f"{EXTRA_DIR}/lora") + "). To resume or keep training in the "
                "residual form: astra_peft.integrations.initialize_astra_for_trainer(trainer, "
                "resume_from_checkpoint=<checkpoint>) or restore_astra_initialization(model, <astra/initial>)."
            ),
        })
    if saved_model:  # weights first: a kill in between leaves rank-2r weights under a marked config (refused)
        for file in reversed(adapter_files(extras / "lora")):
            with atomic_path(folder / file.name) as tmp:
                shutil.copyfile(file, tmp)
    return extras


def restore_astra_initialization(peft_model, initial_dir, adapter_name: str = "default") -> str:
    """Rebuild an Astra initialisation in place from its saved initial adapter, without calibrating.

    A, B ← A₀, B₀ (and any `modules_to_save` as they were at initialisation), then W ← W − s·B₀A₀ on every
    LoRA layer, formed exactly as `initialize_astra_weights` forms it, so the residual base is bit for bit the
    one the adapter was trained on. Use it on a fresh PeftModel of the ORIGINAL base before loading a trained
    residual-form adapter (e.g. before `trainer.train(resume_from_checkpoint=...)`).

    Args:
        peft_model: A PeftModel of the original base whose LoRA settings match the initial adapter's.
        initial_dir: The folder the adapter was saved to right after initialisation (`astra_init/`, or a
            checkpoint's `astra/initial/`).
        adapter_name: The adapter to restore into.

    Returns:
        The sha256 of the restored initial tensors (`init_sha256`).

    Raises:
        RuntimeError: The model was already initialised by Astra (its base is a residual already).
        ValueError: The initial adapter was saved with other LoRA settings, or does not fit the model's layers.
        FileNotFoundError: `initial_dir` is not a saved adapter.
    """
    config_file, weights_file = adapter_files(initial_dir)
    layers = lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"The model has no LoRA layer of adapter '{adapter_name}' to restore into.")
    done = sorted(n for n, layer in layers.items() if getattr(layer, "astra_adapters", ()))
    if done:
        raise RuntimeError(
            f"Layer '{done[0]}' was already initialised by Astra: its base is a residual already, and restoring "
            "would subtract a second one. Restore into a fresh PeftModel of the original base model."
        )
    saved = lora_settings(json.loads(config_file.read_text()))
    live = lora_settings(peft_model.peft_config[adapter_name])
    diff = sorted(k for k in saved if saved[k] != live[k])
    if diff:
        raise ValueError(
            f"The initial adapter in {initial_dir} was saved with other LoRA settings than adapter "
            f"'{adapter_name}' has ({diff[0]}: {saved[diff[0]]!r} saved, {live[diff[0]]!r} now)."
        )
    tensors = load_file(str(weights_file))
    current = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    mismatch = sorted(set(tensors) ^ set(current)) or sorted(
        k for k in tensors if tuple(tensors[k].shape) != tuple(current[k].shape))
    if mismatch:  # checked before anything is written, so a failure leaves the model as it was
        raise ValueError(
            f"The initial adapter in {initial_dir} does not fit adapter '{adapter_name}' of this model (e.g. "
            f"'{mismatch[0]}'): it was saved for another model or LoRA configuration."
        )
    set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name)
    for layer in layers.values():
        subtract_adapter(layer, adapter_name, "product")  # the order Astra's _write uses
        layer.astra_adapters = {adapter_name}
    return init_sha256(peft_model, adapter_name)


def init_sha256(peft_model, adapter_name: str = "default") -> str:
    """The hash of the adapter's current tensors (call it right after initialisation)."""
    return tensors_sha256(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
