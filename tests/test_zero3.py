"""DeepSpeed ZeRO-3 (also ZeRO-2 and the HF Trainer) on CPU, two processes: Astra's init equals one process's and
survives the first optimizer step, before `deepspeed.initialize` or after it (examples/deepspeed_zero3.py)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import torchrun

pytest.importorskip("deepspeed")

from astra_peft import initialize_astra_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "deepspeed_zero3.py"


def _example(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    spec = importlib.util.spec_from_file_location("deepspeed_zero3_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_zero3_matches_single_process_and_survives_the_first_step(tmp_path, monkeypatch):
    torchrun(EXAMPLE, tmp_path, env={"DS_ACCELERATOR": "cpu"})
    results = torch.load(tmp_path / "zero3.pt")
    ex = _example(monkeypatch)
    original = ex.tiny_llama()
    with torch.no_grad():
        original_logits = original(**ex.calibration_batches()[0]).logits
    from peft import get_peft_model

    reference = get_peft_model(ex.tiny_llama(), ex.lora_config())
    initialize_astra_weights(reference, ex.calibration_batches(), ex.astra_config())
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    reference_adapter = get_peft_model_state_dict(reference)

    assert set(results) == {"before_engine", "after_engine", "after_engine_persistent", "after_engine_zero2", "trainer"}
    for route, got in results.items():
        assert set(got["init"]) and set(got["init"]) <= set(expected), route
        # Astra's A, B and residual base, as one process with all four batches computes them.
        init_error = max((got["init"][n] - expected[n]).abs().max().item() for n in got["init"])
        assert init_error <= 1e-6, (route, init_error)
        # ... and the model's outputs are the original model's.
        if "logits" in got:  # (the Trainer route has no forward of its own between init and train())
            assert (got["logits"] - original_logits).abs().max().item() <= 1e-5, route
        # One AdamW step moves each trainable entry by at most ~lr; the frozen residual does not move. Had the
        # optimizer's fp32 masters kept PEFT's default A/B, B would be back at 0 — far from Astra's B.
        for name, value in got["step"].items():
            moved = (value - got["init"][name]).abs().max().item()
            bound = 0.0 if "base_layer" in name else 1.5 * ex.LR
            assert moved <= bound, (route, name, moved)
        # The initial adapter saved from the sharded model holds the reference's tensors, whole.
        if route != "trainer":
            saved = load_file(tmp_path / f"{route}_initial_adapter" / "adapter_model.safetensors")
            assert saved.keys() == reference_adapter.keys(), route
            assert max((saved[k] - reference_adapter[k]).abs().max().item() for k in saved) <= 1e-6, route
        astra_b = max(v.abs().max().item() for n, v in got["init"].items() if "lora_B" in n)
        steps = max((got["step"][n] - got["init"][n]).abs().max().item() for n in got["init"] if "lora_" in n)
        print(f"{route}: max |Δ| vs 1 process {init_error:.1e}; max |Δ adapter| after one step {steps:.1e} "
              f"(lr {ex.LR}); max |B| {astra_b:.2f}")  # pytest -s shows them
        assert astra_b > 1000 * ex.LR, route  # the check above can tell Astra's B from PEFT's zeros


@pytest.mark.slow
def test_zero3_refusals_and_calibration_inside_an_outer_gather(tmp_path):
    torchrun(ROOT / "tests" / "_zero3_refusals.py", tmp_path, nproc=1, env={"DS_ACCELERATOR": "cpu"})
    assert (tmp_path / "ok").read_text() == "ok"
