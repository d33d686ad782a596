"""PEFT's data-driven baselines in the method registry: EVA, CorDA and LoRA-GA, each built with PEFT's own code.

They look at data before training (layer inputs for EVA and CorDA, gradients for LoRA-GA) through PEFT's own
preprocessors; nothing here is ours but the wiring. Registered when `methods.py` imports this module at its end,
after Astra, which is their place in `astra methods`: import the registry from `methods`, not from here.
"""

from __future__ import annotations

import torch

from .method_registry import (
    BaseRebuild,
    BuildContext,
    BuiltModel,
    _require_batches,
    _timed,
    lora_config,
    register_method,
)


# ------------------------------------------------------------------------------------- PEFT data-driven


def _eva_config_cls():
    from peft import EvaConfig

    return EvaConfig


@register_method("eva", "EVA: SVD of layer inputs on data, rank redistribution (PEFT).", config_cls=_eva_config_cls,
                 data="activations")
def _build_eva(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights

    batches = list(_require_batches(ctx, "calibration_batches", "eva")())
    model, t_peft = _timed(get_peft_model, ctx.model, lora_config(ctx, init_lora_weights="eva",
                                                                   eva_config=spec.method_config()))
    state, t_calib = _timed(get_eva_state_dict, model, dataloader=batches)
    _, t_init = _timed(initialize_lora_eva_weights, model, eva_state_dict=state)
    ranks = {k: int(v.shape[0]) for k, v in state.items()}
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_peft + t_init, report={"ranks": ranks})


def _corda_config_cls():
    from peft.tuners.lora.config import CordaConfig

    return CordaConfig


@register_method(
    "corda",
    "CorDA: context-oriented SVD of W·C (corda_method=ipm, default, or kpm) on data (PEFT).",
    config_cls=_corda_config_cls,
    data="activations",
    base=BaseRebuild.SCALED_B,
)
def _build_corda(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.corda import preprocess_corda

    batches = _require_batches(ctx, "calibration_batches", "corda")
    config = lora_config(ctx, init_lora_weights="corda", corda_config=spec.method_config(corda_method="ipm"))

    @torch.no_grad()
    def run_model():
        # PEFT's CorDA hook takes one unpadded sequence per forward (it squeezes the batch dimension).
        for batch in batches():
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                ctx.model(input_ids=ids[mask.bool()][None])

    was_training = ctx.model.training
    ctx.model.eval()
    _, t_calib = _timed(preprocess_corda, ctx.model, config, run_model=run_model)
    ctx.model.train(was_training)
    model, t_init = _timed(get_peft_model, ctx.model, config)
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_init)


def _loraga_config_cls():
    from peft.tuners.lora.config import LoraGAConfig

    return LoraGAConfig


@register_method(
    "lora-ga",
    "LoRA-GA: SVD of the full fine-tuning gradient estimated on data (PEFT).",
    config_cls=_loraga_config_cls,
    data="gradients",
    base=BaseRebuild.PRODUCT,
)
def _build_loraga(ctx: BuildContext, spec) -> BuiltModel:
    from peft import get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    batches = _require_batches(ctx, "gradient_batches", "lora-ga")
    config = lora_config(ctx, init_lora_weights="lora_ga", lora_ga_config=spec.method_config())

    def train_step():
        for batch in batches():
            ctx.model(**batch).loss.backward()

    _, t_calib = _timed(preprocess_loraga, ctx.model, config, train_step)
    model, t_init = _timed(get_peft_model, ctx.model, config)
    return BuiltModel(model, calibration_seconds=t_calib, init_seconds=t_init)
