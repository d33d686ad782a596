"""Saving a trained Astra adapter as a plain LoRA adapter of the ORIGINAL base model.

Astra rewrites the frozen weights (W ← W − s·B₀A₀), so its adapter only fits the residual base. Given the adapter
saved right after initialisation, the trained change ΔW = s·(BA − B₀A₀) is a rank-2r LoRA of the original base:
A' = [A; A₀], B' = [B, −B₀], with α doubled so that the scaling α/r stays s (PEFT's
`path_initial_model_for_weight_conversion` does the same for PiSSA, OLoRA, CorDA).

This module does it on the saved files, not on the live model. PEFT's route loads the initial adapter into the
model as a second adapter and deletes it again, which draws from torch's global RNG (LoRA's default init of the
temporary adapter): called from a checkpoint callback in the middle of training, that shifts every later random
draw, and a resumed run no longer matches the uninterrupted one. It also drops trained `modules_to_save` tensors
(a classification head) and biases, which would silently revert to the base model's; here every tensor that is
not a LoRA factor is carried over as trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from ._adapter_checks import is_residual, mark_residual
from ._io import atomic_path


def lora_weights_for_original_base(trained: dict, initial: dict) -> dict:
    """The rank-2r plain-LoRA tensors of the original base: A' = [A; A₀], B' = [B, −B₀].

    Args:
        trained: The trained adapter's state dict as PEFT saves it (`…lora_A.weight`, `…lora_B.weight`, and any
            `modules_to_save` / bias tensors).
        initial: The same adapter's state dict right after initialisation.

    Returns:
        The converted state dict. Tensors other than the LoRA factors are taken from `trained` unchanged.

    Raises:
        ValueError: The two state dicts hold different LoRA layers or shapes (another adapter, another rank), or
            a LoRA tensor this conversion cannot handle (DoRA magnitudes, LoRA biases, embedding adapters).
    """
    lora_keys = {k for k in trained if "lora_" in k} | {k for k in initial if "lora_" in k}
    odd = sorted(k for k in lora_keys if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")))
    if odd:
        raise ValueError(
            f"Cannot convert adapter tensor '{odd[0]}' to a plain LoRA: only lora_A/lora_B weights of linear "
            "layers are supported (no DoRA, lora_bias or embedding adapters)."
        )
    missing = sorted(k for k in lora_keys if k not in trained or k not in initial)
    if missing:
        raise ValueError(
            f"The trained and the initial adapter do not hold the same LoRA layers (e.g. '{missing[0]}' is in only "
            "one of them): the initial adapter belongs to another model or LoRA configuration."
        )
    out = {}
    for key, value in trained.items():
        if key not in lora_keys:
            out[key] = value.contiguous()
            continue
        start = initial[key].to(value.dtype)
        if start.shape != value.shape:
            raise ValueError(
                f"Adapter tensor '{key}' has shape {tuple(value.shape)} but {tuple(start.shape)} in the initial "
                "adapter: it belongs to another LoRA configuration."
            )
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([value, start], dim=0).contiguous()
        else:
            out[key] = torch.cat([value, -start], dim=1).contiguous()
    return out


def lora_config_for_original_base(config: dict) -> dict:
    """The adapter_config.json of the converted adapter: rank 2r, the same scaling, `init_lora_weights: true`.

    Args:
        config: The trained adapter's adapter_config.json, as a dict.

    Returns:
        A new dict; `config` is not modified.

    Raises:
        ValueError: rsLoRA combined with rank_pattern/alpha_pattern (its per-layer scaling α/√r cannot be kept
            by one alpha rule, as PEFT's own conversion also refuses).
    """
    config = dict(config)
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError("Cannot convert an rsLoRA adapter with rank_pattern/alpha_pattern to a plain LoRA.")
    factor = 2**0.5 if config.get("use_rslora") else 2  # keep scaling α/r (or α/√r) when r doubles
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = factor * config["lora_alpha"]
    if config.get("rank_pattern"):
        config["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}
    if config.get("alpha_pattern"):
        config["alpha_pattern"] = {k: 2 * v for k, v in config["alpha_pattern"].items()}
    config["init_lora_weights"] = True  # the base is the original one: nothing to subtract when loading
    return config


def adapter_files(folder) -> tuple[Path, Path]:
    """(adapter_config.json, adapter_model.safetensors) of a saved adapter folder, or a clear error."""
    folder = Path(folder)
    config, weights = folder / CONFIG_NAME, folder / SAFETENSORS_WEIGHTS_NAME
    if not config.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{folder} is not a saved PEFT adapter: it needs {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME} "
            "(adapters saved with safe_serialization=False are not supported)."
        )
    return config, weights


def convert_saved_adapter(trained_dir, initial_dir, out_dir) -> Path:
    """Write the plain-LoRA conversion of the adapter saved in `trained_dir` to `out_dir`, from the files alone.

    Args:
        trained_dir: A saved trained adapter (its base is the Astra residual).
        initial_dir: The same adapter saved right after initialisation.
        out_dir: Where to write the converted adapter; created, or replaced if it holds one. It must not be
            either input folder.

    Returns:
        `out_dir` as a Path.

    Raises:
        ValueError: `out_dir` is one of the input folders, or the adapters do not fit together.
        FileNotFoundError: An input folder is not a saved adapter.
    """
    out_dir = Path(out_dir)
    _refuse_overlap(out_dir, trained_dir, initial_dir)
    return _convert(trained_dir, initial_dir, out_dir)


def save_as_lora(model: PeftModel, path, initial_path, adapter_name: str = "default") -> Path:
    """Save `model`'s trained adapter to `path` as a plain LoRA adapter of the original base model.

    Loading `path` onto the untouched base model reproduces the trained model's outputs, trained heads
    (`modules_to_save`) and biases included. The model itself is not touched (no adapter is added, no random
    number drawn), so this is safe in the middle of training. On a ZeRO-3 or FSDP2 model every rank must call
    it (the adapter is gathered whole); rank 0 writes the files.

    Args:
        model: The trained PeftModel (its base holds the Astra residual).
        path: The output folder. For a non-default adapter the files go to `path/adapter_name`, as PEFT does.
        initial_path: The folder the adapter was saved to right after `initialize_astra_weights`
            (`model.save_pretrained(initial_path)`); for a non-default adapter, that folder or its
            `adapter_name` sub-folder.
        adapter_name: The adapter to convert.

    Returns:
        The folder holding the converted adapter.

    Raises:
        ValueError: `path` would overwrite the initial adapter, or the initial adapter does not fit.
    """
    path = Path(path)
    folder = path if adapter_name == "default" else path / adapter_name
    initial = Path(initial_path)
    if adapter_name != "default" and not (initial / SAFETENSORS_WEIGHTS_NAME).is_file():
        initial = initial / adapter_name
    _refuse_overlap(folder, initial)
    if not _sharded(model):
        model.save_pretrained(str(path), selected_adapters=[adapter_name])
        # The residual-form files just written are converted in place: read both, then replace each file atomically.
        return _convert(folder, initial, folder)
    # ZeRO-3 / FSDP2: PEFT's save reads model.state_dict(), which holds ZeRO-3's empty placeholders (written
    # without an error) or this rank's DTensor shards. Every rank gathers the adapter whole (a collective), rank 0
    # writes and converts, and the others wait for the files to exist.
    import torch.distributed as dist

    from .sharding import adapter_state_dict, unwrap

    state = adapter_state_dict(model)
    if not dist.is_initialized():
        unwrap(model).save_pretrained(str(path), selected_adapters=[adapter_name], state_dict=state)
        return _convert(folder, initial, folder)
    failure = [None]
    if dist.get_rank() == 0:
        try:
            unwrap(model).save_pretrained(str(path), selected_adapters=[adapter_name], state_dict=state)
            _convert(folder, initial, folder)
        except Exception as err:  # told to every rank below, then raised here as it is
            failure = [f"{type(err).__name__}: {err}"]
            raise
        finally:
            # in place of a barrier: the others wait for rank 0's outcome, and raise too rather than wait forever
            dist.broadcast_object_list(failure, src=0)
    else:
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise RuntimeError(f"save_as_lora failed on rank 0, which writes the files: {failure[0]}")
    return folder


def load_residual_adapter(model, folder, adapter_name: str = "default", *, is_trainable: bool = False) -> PeftModel:
    """Load an adapter saved in residual form (`save_pretrained` after `initialize_astra_weights`) onto its base.

    Such an adapter reproduces the trained model only on the residual base W − s·B₀·A₀ it was trained on (for
    example `peft_model.unload()` saved next to it, or what `astra_peft.quantized.save_for_quantized_base` writes),
    so its config says `init_lora_weights: "astra"` and `PeftModel.from_pretrained` refuses it; on the original
    base, load the plain LoRA `save_as_lora` writes instead. This reads the config, loads the weights as they are
    (no initialisation runs), and marks the loaded adapter again, so that its next save says the same.

    Args:
        model: The residual base model (not the original one: nothing here can tell them apart).
        folder: The saved adapter folder.
        adapter_name: The name to load the adapter under.
        is_trainable: Load it trainable (False for inference, as PEFT).

    Returns:
        The PeftModel.
    """
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(folder))
    marked = is_residual(config)
    if marked:
        config.init_lora_weights = True  # PEFT refuses the marker; the weights come from the file
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable,
                                           config=config)
    if marked:
        mark_residual(peft_model.peft_config[adapter_name])
    return peft_model


def _sharded(model) -> bool:
    from .sharding import is_dtensor, is_zero3, unwrap

    return any(is_zero3(p) or is_dtensor(p) for p in unwrap(model).parameters())


def _convert(trained_dir, initial_dir, out_dir: Path) -> Path:
    trained_config, trained_weights = adapter_files(trained_dir)
    _, initial_weights = adapter_files(initial_dir)
    tensors = lora_weights_for_original_base(load_file(str(trained_weights)), load_file(str(initial_weights)))
    config = lora_config_for_original_base(json.loads(trained_config.read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    # weights first: a kill in between leaves rank-2r weights under a rank-r config, which PEFT refuses to load
    _write_atomic(out_dir / SAFETENSORS_WEIGHTS_NAME,
                  lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _write_atomic(out_dir / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return out_dir


def _refuse_overlap(out_dir, *inputs) -> None:
    out = Path(out_dir).resolve()
    for folder in inputs:
        if Path(folder).resolve() == out:
            raise ValueError(f"The converted adapter would overwrite the adapter in {folder}: choose another folder.")


def _write_atomic(dest: Path, write) -> None:
    with atomic_path(dest) as tmp:  # the project's one atomic-write helper (astra_peft/_io.py)
        write(tmp)


def copy_adapter(src, dest) -> Path:
    """Copy a saved adapter's two files to `dest` (created), each atomically."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for file in adapter_files(src):
        _write_atomic(dest / file.name, lambda p, f=file: shutil.copyfile(f, p))
    return dest
