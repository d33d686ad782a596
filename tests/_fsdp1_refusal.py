"""Under torchrun: FSDP1 is refused, on the wrapper and on the model inside it, with the module or layer named."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_batches, peft_model
from torch.distributed.fsdp import FullyShardedDataParallel

from astra_peft import initialize_astra_weights

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
Path(sys.argv[1], f"rank{rank}").write_text("ok")
dist.destroy_process_group()
