"""Two ranks, each with half the data, initialise exactly as one process with all of it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_batches, peft_model

from astra_peft import AstraConfig, initialize_astra_weights
from astra_peft.layers import lora_layers

HERE = Path(__file__).parent


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_distributed_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single = peft_model("llama")
    initialize_astra_weights(single, make_batches(n_batches=4), AstraConfig(accumulation_dtype="float64", show_progress=False))
    for name, layer in lora_layers(single, "default").items():
        b = layer.lora_B["default"].weight.detach()
        for r in ranks:
            assert torch.allclose(r[name], ranks[0][name])  # every rank initialises identically
            assert torch.allclose(r[name], b, atol=1e-5), name  # ... and as one process on all the data
