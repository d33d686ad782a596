"""Under torchrun: FSDP1 is refused, on the wrapper and on the model inside it, with the module or layer named;
on an FSDP2 model, ranks with different numbers of calibration batches get an error instead of a hang."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_batches, peft_model
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

from astra_peft import AstraConfig, initialize_astra_weights, save_as_lora
from astra_peft.layers import weight_matrix

dist.init_process_group("gloo")
rank = dist.get_rank()
model = peft_model("llama")
wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)  # as PEFT needs
with pytest.raises(TypeError, match="wrapped by FSDP1") as on_wrapper:
    initialize_astra_weights(wrapped, make_batches())
with pytest.raises(TypeError, match=r"Layer '.*q_proj' holds a weight of shape|wrapped by FSDP1") as inside:
    initialize_astra_weights(wrapped.module, make_batches())
if rank == 0:
    print(f"on the wrapper: {on_wrapper.value}\ninside it: {inside.value}")

sharded = peft_model("llama")
for layer in sharded.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(sharded)
with pytest.raises(TypeError, match="FSDP2 DTensor: read it whole with astra_peft.layers.full_weight"):
    weight_matrix(sharded.base_model.model.model.layers[0].mlp.up_proj.base_layer)
quiet = AstraConfig(show_progress=False)
with pytest.raises(RuntimeError, match=r"Calibration batch 2: 1 rank\(s\) have it and 1 do not") as uneven:
    initialize_astra_weights(sharded, make_batches(n_batches=4)[: 3 - rank], quiet)  # rank 0: 3 batches, rank 1: 2
if rank == 0:
    print(f"uneven batches: {uneven.value}")
# One rank's max_tokens cap stops every rank at the same batch (rank 1 alone would run all four).
capped = AstraConfig(show_progress=False, max_tokens=1 if rank == 0 else None)
report = initialize_astra_weights(sharded, make_batches(n_batches=4), capped)
tokens = {layer.tokens for layer in report.layers}
assert tokens == {2 * int(make_batches(n_batches=1)[0]["attention_mask"].sum())}, tokens  # one batch per rank
# save_as_lora on a sharded model: rank 0 writes; when it fails (no initial adapter there), every rank raises
# naming the folder instead of the others waiting at a barrier forever.
missing = Path(sys.argv[1], "no-initial-adapter")
with pytest.raises((FileNotFoundError, RuntimeError), match="no-initial-adapter"):
    save_as_lora(sharded, Path(sys.argv[1], "lora-out"), missing)
Path(sys.argv[1], f"rank{rank}").write_text("ok")
dist.barrier()  # nobody tears the group down while a peer still uses it
dist.destroy_process_group()
