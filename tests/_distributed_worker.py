"""Run under torchrun: each rank calibrates on its half of the batches, then saves its adapter."""

import sys

import torch
import torch.distributed as dist
from conftest import make_batches, peft_model

from astra_peft import AstraConfig, initialize_astra_weights
from astra_peft.layers import lora_layers

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mine = make_batches(n_batches=4)[rank::world]
model = peft_model("llama")
initialize_astra_weights(model, mine, AstraConfig(accumulation_dtype="float64", show_progress=False))
weights = {n: l.lora_B["default"].weight.detach() for n, l in lora_layers(model, "default").items()}
torch.save(weights, f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
