"""Resuming a run without calibrating again: the model `build_method` made, rebuilt from the initial adapter the
run directory saved right after initialisation (adapter_init/), with the frozen base rebuilt as the method
declared at registration (`methods.BaseRebuild`), bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .methods import METHODS


@torch.no_grad()
def restore_initial_adapter(model: nn.Module, adapter_dir, method, mutates_base: Optional[bool] = None):
    """Rebuild what `build_method` made from its saved initial adapter, without calibrating again.

    A plain PeftModel with the saved weights and, for methods that rewrote the base, the base rebuilt as the
    method's declared `BaseRebuild` says (W ← W − s·B₀A₀, rounded as the method rounds it). This is what makes
    resuming an Astra run cheap, and exact.

    Args:
        model: The original base model, freshly loaded (its weights untouched).
        adapter_dir: The folder `save_pretrained` wrote right after `build_method`.
        method: The parsed `specs.MethodSpec` that built it, or its registered method name (then the method's
            declared `base`, which a spec option such as Astra's factor_init=zero_a can change: pass the spec).
        mutates_base: What the run directory recorded (init.json); must agree with the method's declaration.

    Returns:
        The PeftModel, ready to train or to resume from a checkpoint.

    Raises:
        ValueError: The saved adapter does not fit `model`, or the record and the method's declaration disagree.
    """
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    spec = None if isinstance(method, str) else method
    method = method if spec is None else spec.method
    rebuild = METHODS[method].rebuild(spec)
    if mutates_base is not None and mutates_base != rebuild.rewrites_base:
        raise ValueError(
            f"{adapter_dir}: the run recorded mutates_base={mutates_base}, but method {method!r} declares "
            f"base={rebuild.name}; start the run again (--force) rather than rebuild a base that may not match."
        )
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    config.init_lora_weights = True  # the weights come from the file, not from running the init again
    for sub in ("eva_config", "corda_config", "lora_ga_config"):
        if getattr(config, sub, None) is not None:
            setattr(config, sub, None)
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir), device="cpu"))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir} does not fit this model: unexpected keys {result.unexpected_keys[:3]}")
    rebuild.apply(peft_model, "default")
    return peft_model
