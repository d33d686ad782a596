"""FSDP2 (`fully_shard`) on CPU, two processes: Astra's init equals one process's and is what the optimizer steps
from, before or after sharding (examples/fsdp2.py). FSDP1 flat parameters and malformed weights are refused."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import lora_config, peft_model, tiny_llama, torchrun
from torch import nn

from astra_peft import collect_activation_stats, initialize_astra_weights

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fsdp2.py"


def _example():
    spec = importlib.util.spec_from_file_location("fsdp2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_is_what_training_steps_from(tmp_path):
    torchrun(EXAMPLE, tmp_path)
    results = torch.load(tmp_path / "fsdp2.pt")
    ex = _example()
    with torch.no_grad():
        original_logits = ex.tiny_llama()(**ex.calibration_batches()[0]).logits
    from peft import get_peft_model

    reference = get_peft_model(ex.tiny_llama(), ex.lora_config())
    initialize_astra_weights(reference, ex.calibration_batches(), ex.astra_config())
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    reference_adapter = get_peft_model_state_dict(reference)

    assert set(results) == {"before_sharding", "after_sharding", "after_sharding_root_only"}
    for route, got in results.items():
        assert set(got["init"]) and set(got["init"]) <= set(expected), route
        # Everything PEFT made trainable still is (FSDP2 swaps parameter objects under PEFT's disable_adapter).
        assert got["trainable"] == sorted(n for n, p in reference.named_parameters() if p.requires_grad), route
        init_error = max((got["init"][n] - expected[n]).abs().max().item() for n in got["init"])
        assert init_error <= 1e-6, (route, init_error)
        assert (got["logits"] - original_logits).abs().max().item() <= 1e-5, route
        for name, value in got["step"].items():  # one AdamW step: ≤ ~lr per trainable entry, frozen ones still
            moved = (value - got["init"][name]).abs().max().item()
            assert moved <= (0.0 if "base_layer" in name else 1.5 * ex.LR), (route, name, moved)
        # The initial adapter saved from the sharded model holds the reference's tensors, whole.
        saved = load_file(tmp_path / f"{route}_initial_adapter" / "adapter_model.safetensors")
        assert saved.keys() == reference_adapter.keys(), route
        assert max((saved[k] - reference_adapter[k]).abs().max().item() for k in saved) <= 1e-6, route
        # The trained adapter, saved by save_as_lora from the sharded model, is a plain LoRA of the ORIGINAL base.
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(ex.tiny_llama(), tmp_path / f"{route}_lora").eval()
        with torch.no_grad():
            reload_error = (reloaded(**ex.calibration_batches()[0]).logits - got["trained_logits"]).abs().max().item()
        assert reload_error <= 1e-5, (route, reload_error)
        assert (got["trained_logits"] - original_logits).abs().max().item() > 1e-4, route  # training changed it
        astra_b = max(v.abs().max().item() for n, v in got["init"].items() if "lora_B" in n)
        steps = max((got["step"][n] - got["init"][n]).abs().max().item() for n in got["init"] if "lora_" in n)
        print(f"{route}: max |Δ| vs 1 process {init_error:.1e}; max |Δ adapter| after one step {steps:.1e} "
              f"(lr {ex.LR}); max |B| {astra_b:.2f}")  # pytest -s shows them
        assert astra_b > 1000 * ex.LR, route  # Astra's B, far from PEFT's zeros


@pytest.mark.slow
def test_fsdp1_is_refused_naming_the_module_and_uneven_batches_raise(tmp_path):
    torchrun(ROOT / "tests" / "_fsdp_refusals.py", tmp_path, nproc=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("rank")) == ["rank0", "rank1"]


def test_a_flat_parameter_is_refused_before_anything_runs(batches):
    model = peft_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = nn.Parameter(torch.zeros(8))
    flat._is_flat_param = True  # what FSDP1's FlatParameter carries
    model.base_model.model.model.layers[0].register_parameter("_flat_param", flat)
    with pytest.raises(TypeError, match=r"Module '.*layers\.0' is wrapped by FSDP1.*fully_shard"):
        initialize_astra_weights(model, batches)
    with pytest.raises(TypeError, match="FSDP1"):
        collect_activation_stats(model, batches, lora_config("llama"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("shape", [(0,), (32 * 32,), (0, 32)])
def test_an_empty_or_flattened_weight_is_refused_naming_the_layer(batches, shape):
    model = tiny_llama()
    layer = model.model.layers[1].self_attn.q_proj
    layer.weight = nn.Parameter(torch.zeros(shape))  # what a wrapper leaves behind in place of the (32, 32) matrix
    with pytest.raises(TypeError, match=r"Layer 'model\.layers\.1\.self_attn\.q_proj' holds a weight of shape"):
        collect_activation_stats(model, batches, lora_config("llama"))


def test_sharded_activations_are_refused_naming_the_layer(batches):
    # What tensor parallelism looks like from a hook: each rank sees a slice of a layer's output features.
    from astra_peft import AstraConfig

    model = tiny_llama()
    layer = model.model.layers[0].mlp.up_proj
    layer.register_forward_hook(lambda module, args, output: output[..., : output.shape[-1] // 2])
    # (max_normalized: no probing forward, so the collector's hook is the first to see the slice)
    with pytest.raises(RuntimeError, match=r"Layer 'model\.layers\.0\.mlp\.up_proj': its output activations have "
                                            r"32 features here \(Tensor\), where the layer has 64: they are sharded"):
        collect_activation_stats(model, batches, lora_config("llama"), AstraConfig(statistic="max_normalized"))
