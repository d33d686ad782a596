"""Resuming a run without calibrating again: the model `build_method` made, rebuilt from the initial adapter the
run directory saved right after initialisation (adapter_init/), with the frozen base rebuilt as the method
declared at registration (`methods.BaseRebuild`), bit for bit; and `build_or_restore`, which decides between
building and restoring by the fingerprint of what decides the initial adapter.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
from torch import nn

from .._adapter_checks import is_residual, mark_residual
from .methods import METHODS, BuildContext, BuiltModel, build_method
from .rank_allocation import check_restored_ranks
from .rundir import RunDir


@torch.no_grad()
def restore_initial_adapter(model: nn.Module, adapter_dir, method: str, mutates_base: Optional[bool] = None):
    """Rebuild what `build_method` made from its saved initial adapter, without calibrating again.

    A plain PeftModel with the saved weights and, for methods that rewrote the base, the base rebuilt as the
    method's declared `BaseRebuild` says (W ← W − s·B₀A₀, rounded as the method rounds it). This is what makes
    resuming an Astra run cheap, and exact.

    Args:
        model: The original base model, freshly loaded (its weights untouched).
        adapter_dir: The folder `save_pretrained` wrote right after `build_method`.
        method: The registered method name that built it.
        mutates_base: What the run directory recorded (init.json); must agree with the method's declaration.

    Returns:
        The PeftModel, ready to train or to resume from a checkpoint.

    Raises:
        ValueError: The saved adapter does not fit `model`, or the record and the method's declaration disagree.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    rebuild = METHODS[method].base
    if mutates_base is not None and mutates_base != rebuild.rewrites_base:
        raise ValueError(
            f"{adapter_dir}: the run recorded mutates_base={mutates_base}, but method {method!r} declares "
            f"base={rebuild.name}; start the run again (--force) rather than rebuild a base that may not match."
        )
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    residual = is_residual(config)  # saved by Astra: its later saves must say so again
    config.init_lora_weights = True  # the weights come from the file, not from running the init again
    for sub in ("eva_config", "corda_config", "lora_ga_config"):
        if getattr(config, sub, None) is not None:
            setattr(config, sub, None)
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir), device="cpu"))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir} does not fit this model: unexpected keys {result.unexpected_keys[:3]}")
    rebuild.apply(peft_model, "default")
    if residual:
        mark_residual(peft_model.peft_config["default"])
    return peft_model



# What decides the initial adapter: a saved one is reused only when all of these match.
_INIT_KEYS = ("model", "task", "data", "eval_data", "seed", "max_length", "dtype", "train_samples",
              "calibration_batch_size", "method_spec", "effective", "splits")


def init_fingerprint(resolved: dict) -> str:
    """sha256 of the resolved settings that decide the initial adapter (the learning rate does not)."""
    payload = {k: resolved.get(k) for k in _INIT_KEYS}
    payload["effective"] = {k: v for k, v in payload["effective"].items() if k != "lr"}
    if resolved.get("forgetting_data"):  # calibration on its corpus leaves its share out; unset: as before
        payload["forgetting_data"] = resolved["forgetting_data"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def build_or_restore(spec, ctx: BuildContext, run: RunDir, fingerprint: str, is_main: bool) -> BuiltModel:
    """Build the method, or, when this run directory already holds the initial adapter for exactly this
    configuration (a restart after Ctrl-C), rebuild the model from it without calibrating again. The saved
    initial adapter also serves the plain-LoRA conversion at the end."""
    init_dir, meta = run.file(RunDir.ADAPTER_INIT), run.read_init()
    if meta and meta.get("fingerprint") == fingerprint and init_dir.is_dir():
        model = restore_initial_adapter(ctx.model, init_dir, spec.method, meta["mutates_base"])
        if meta["report"].get("allocation"):  # the ranks the run allocated, whatever adapter_config.json says now
            check_restored_ranks(model, meta["report"]["allocation"]["ranks"], str(init_dir))
        return BuiltModel(model, calibration_seconds=meta["calibration_seconds"], init_seconds=meta["init_seconds"],
                          mutates_base=meta["mutates_base"], report={**meta["report"], "restored_from": str(init_dir)})
    built = build_method(spec, ctx)
    if is_main and hasattr(built.model, "peft_config"):
        run.clear([RunDir.INIT])
        with run.adapter_dir(RunDir.ADAPTER_INIT) as tmp:
            built.model.save_pretrained(str(tmp))
        # init.json last: its presence says adapter_init/ is complete
        run.write_init({"fingerprint": fingerprint, "mutates_base": built.mutates_base,
                        "calibration_seconds": built.calibration_seconds, "init_seconds": built.init_seconds,
                        "report": built.report})
    return built
