"""Rank allocation by effective rank: budget kept, ranks follow the spectrum, outputs unchanged at init."""

import pytest
import torch
from peft import get_peft_model

from astra_peft import AstraConfig, allocate_ranks, collect_activation_stats, initialize_astra_weights
from astra_peft.layers import lora_layers

from conftest import LLAMA_TARGETS, logits, lora_config, make_batches, tiny_llama

QUIET = AstraConfig(show_progress=False)


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama()
    config = lora_config("llama", r=4, alpha=8)
    stats = collect_activation_stats(model, make_batches(n_batches=6), config, QUIET)
    return model, config, stats


def test_budget_is_uniform_ranks_and_is_respected(calibrated):
    model, config, stats = calibrated
    allocation = allocate_ranks(model, stats, config)
    peft_model = get_peft_model(tiny_llama(), allocation.apply(config))
    layers = lora_layers(peft_model, "default")
    # The ranks PEFT actually built are the allocation's, and their parameter count fits uniform r=4's.
    built = {name: layer.r["default"] for name, layer in layers.items()}
    assert built == allocation.ranks
    params = sum(l.lora_A["default"].weight.numel() + l.lora_B["default"].weight.numel() for l in layers.values())
    uniform = get_peft_model(tiny_llama(), lora_config("llama", r=4, alpha=8))
    uniform_params = sum(
        l.lora_A["default"].weight.numel() + l.lora_B["default"].weight.numel()
        for l in lora_layers(uniform, "default").values()
    )
    assert params == allocation.used <= allocation.budget == uniform_params
    # Rounding leaves less than one rank of the most expensive layer unused.
    assert allocation.budget - allocation.used < max(sum(l.get_base_layer().weight.shape) for l in layers.values())
    assert len(set(allocation.ranks.values())) > 1  # a real allocation, not uniform r again


def test_scaling_is_kept_per_layer(calibrated):
    model, config, stats = calibrated
    peft_model = get_peft_model(tiny_llama(), allocate_ranks(model, stats, config).apply(config))
    scalings = [layer.scaling["default"] for layer in lora_layers(peft_model, "default").values()]
    assert scalings == pytest.approx([config.lora_alpha / config.r] * len(scalings))


def test_ranks_follow_effective_rank_among_equal_shapes(calibrated):
    model, config, stats = calibrated
    allocation = allocate_ranks(model, stats, config)
    # Same shape, same cost: a layer with a higher effective rank never gets a lower rank.
    for suffix in LLAMA_TARGETS:
        names = sorted((n for n in allocation.ranks if n.endswith(suffix)), key=allocation.effective_ranks.get)
        ranks = [allocation.ranks[n] for n in names]
        assert ranks == sorted(ranks), suffix


def test_outputs_unchanged_at_init_with_allocated_ranks(calibrated):
    model, config, stats = calibrated
    batch = make_batches(n_batches=1, seed=7)[0]
    reference = logits(model, batch)
    peft_model = get_peft_model(tiny_llama(), allocate_ranks(model, stats, config).apply(config))
    report = initialize_astra_weights(peft_model, stats=stats, astra_config=QUIET)
    assert {l.name: l.rank for l in report.layers} == allocate_ranks(model, stats, config).ranks
    assert torch.allclose(logits(peft_model, batch), reference, atol=1e-5)


def test_bounds_and_bad_configs_are_refused(calibrated):
    model, config, stats = calibrated
    capped = allocate_ranks(model, stats, config, max_rank=5)
    assert max(capped.ranks.values()) <= 5 and min(capped.ranks.values()) >= 1
    with pytest.raises(ValueError, match="min_rank"):
        allocate_ranks(model, stats, config, min_rank=5)
    with pytest.raises(ValueError, match="rank_pattern"):
        allocate_ranks(model, stats, lora_config("llama", r=4, rank_pattern={"q_proj": 2}))
    with pytest.raises(ValueError, match="rsLoRA|use_rslora"):
        allocate_ranks(model, stats, lora_config("llama", r=4, use_rslora=True))
    from peft import LoraConfig

    partial = collect_activation_stats(model, make_batches(), LoraConfig(r=4, target_modules=["q_proj"]), QUIET)
    with pytest.raises(ValueError, match="no entry"):
        allocate_ranks(model, partial, config)
