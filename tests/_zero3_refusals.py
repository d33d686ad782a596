"""Under torchrun (one process is enough): what Astra refuses on a ZeRO-3 model, and what it allows."""

import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from conftest import make_batches, peft_model, tiny_llama, lora_config

from astra_peft import collect_activation_stats, initialize_astra_weights
from astra_peft.layers import lora_layers
from peft import get_peft_model

deepspeed.init_distributed("gloo")
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
with deepspeed.zero.Init(config_dict_or_path=config):
    base = tiny_llama()
model = get_peft_model(base, lora_config("llama"))
params = list(model.parameters())

# Calibration inside the caller's own full gather: no nested GatheredParameters error, same statistics.
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
plain = peft_model("llama")  # unpartitioned, with the very weights zero.Init gave the partitioned one
plain.load_state_dict(before)
initialize_astra_weights(plain, make_batches())
with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
    got = dict(model.named_parameters())
    error = max((got[n] - p).abs().max().item() for n, p in plain.named_parameters())
assert error <= 1e-6, error
print(f"ZeRO-3 stats route: max |Δ| vs unpartitioned = {error:.2e}")
Path(sys.argv[1], "ok").write_text("ok")
