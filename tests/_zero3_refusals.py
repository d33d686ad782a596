"""Under torchrun (one process is enough): Astra on a ZeRO-3-partitioned model before any engine exists, on
LLaMA and GPT-2 (whose Conv1D stores Wᵀ), and what it refuses."""

import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from conftest import MODELS, lora_config, make_batches, peft_model

from astra_peft import collect_activation_stats, effective_ranks, initialize_astra_weights
from astra_peft.layers import lora_layers, weight_matrix
from peft import get_peft_model

deepspeed.init_distributed("gloo")
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def partitioned(family):
    with deepspeed.zero.Init(config_dict_or_path=config):
        base = MODELS[family][0]()
    assert all(hasattr(p, "ds_id") for p in base.parameters())
    return get_peft_model(base, lora_config(family))


def whole(model):
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def unpartitioned_reference(family, weights):
    plain = peft_model(family)  # with the very weights zero.Init gave the partitioned model
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing)  # tied to the embedding
    initialize_astra_weights(plain, make_batches())
    return dict(plain.named_parameters())


# Calibration inside the caller's own full gather: no nested GatheredParameters error, same statistics.
model = partitioned("llama")
params = list(model.parameters())
with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = collect_activation_stats(model, make_batches(), lora_config("llama"))
    # Writing inside it is refused (leaving the gather would discard the new weights), and nothing changed.
    with pytest.raises(RuntimeError, match="outside GatheredParameters"):
        initialize_astra_weights(model, stats=stats)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
assert not any(getattr(l, "astra_adapters", None) for l in lora_layers(model, "default").values())
# Outside it, the same statistics initialise the partitioned model exactly as an unpartitioned one.
initialize_astra_weights(model, stats=stats)
expected = unpartitioned_reference("llama", before)
got = whole(model)
errors = {"llama (stats)": max((got[n] - p).abs().max().item() for n, p in expected.items())}

# Calibration and init in one call, before any engine, on every family.
for family in ("llama", "gpt2"):  # (BERT cannot even be built under zero.Init: transformers indexes its padding row)
    model = partitioned(family)
    before = whole(model)
    initialize_astra_weights(model, make_batches())
    expected = unpartitioned_reference(family, before)
    got = whole(model)
    errors[family] = max((got[n] - p).abs().max().item() for n, p in expected.items())
# Effective ranks (a forward with adapters on) run on the partitioned model too, as on the unpartitioned one.
model = partitioned("llama")
plain = peft_model("llama")
plain.load_state_dict(whole(model))
ranks, plain_ranks = effective_ranks(model, make_batches()), effective_ranks(plain, make_batches())
errors["effective ranks"] = max(abs(ranks[n] - plain_ranks[n]) for n in plain_ranks)
# Code that reads a weight without gathering it gets a clear error, not an empty tensor.
with pytest.raises(TypeError, match="ZeRO-3 partition: read it whole with astra_peft.layers.full_weight"):
    weight_matrix(partitioned("llama").base_model.model.model.layers[0].mlp.up_proj.base_layer)

# After deepspeed.initialize, a master copy that does not take the values is refused, not trained from.
model = peft_model("llama")
trainable = [p for p in model.parameters() if p.requires_grad]
engine_config = {**config, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
engine, optimizer, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=engine_config)
optimizer.set_full_hp_param = lambda value, param, optim_state_key=None: None  # a master Astra cannot reach
with pytest.raises(RuntimeError, match="fp32 master copy.*before `deepspeed.initialize`"):
    initialize_astra_weights(engine, make_batches())

print("ZeRO-3 before the engine, max |Δ| vs unpartitioned:", {k: f"{v:.1e}" for k, v in errors.items()})
assert max(errors.values()) <= 1e-6, errors
Path(sys.argv[1], "ok").write_text("ok")
