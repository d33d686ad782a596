"""The harness's ``astra:rank_allocation=effective_rank``: spec, built model, outputs at init, resume (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from astra_peft.layers import lora_layers
from conftest import LLAMA_TARGETS, logits, make_batches, tiny_llama
from test_harness import finetune, make_generation_jsonl, make_tiny_llama  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ALLOCATED = "astra:rank_allocation=effective_rank"


def _context(model):
    from astra_peft.harness.methods import BuildContext

    calibration = make_batches(n_batches=6)
    return BuildContext(model=model, task_kind="generation", target_modules=LLAMA_TARGETS, rank=4, alpha=8,
                        calibration_batches=lambda: iter(calibration), progress=False)


def _build(spec):
    from astra_peft.harness.methods import build_method
    from astra_peft.harness.specs import parse_method_spec

    return build_method(parse_method_spec(spec), _context(tiny_llama()))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _ranks(model) -> dict[str, int]:
    return {name: layer.r["default"] for name, layer in lora_layers(model, "default").items()}


@pytest.fixture(scope="module")
def allocated():
    return _build(ALLOCATED)


# ------------------------------------------------------------------------------------------------- the spec


def test_spec_option_parses_and_stays_out_of_astra_config():
    from astra_peft import AstraConfig
    from astra_peft.harness.kinds import RANK_ALLOCATION_KINDS
    from astra_peft.harness.specs import parse_method_spec

    spec = parse_method_spec(f"{ALLOCATED}:lr=2e-4")
    assert spec.run_options().rank_allocation == "effective_rank" and spec.overrides == {"lr": 2e-4}
    assert isinstance(spec.method_config(), AstraConfig)  # rank_allocation is not handed to AstraConfig
    assert parse_method_spec("astra").run_options().rank_allocation == "uniform"
    assert parse_method_spec("lora").run_options() is None
    with pytest.raises(ValueError, match=r"bad value 'erank' for rank_allocation: choose one of "
                                         + ", ".join(RANK_ALLOCATION_KINDS)):
        parse_method_spec("astra:rank_allocation=erank")
    with pytest.raises(ValueError, match="method 'lora' has no option 'rank_allocation'"):
        parse_method_spec("lora:rank_allocation=effective_rank")
    with pytest.raises(ValueError, match="rank_allocation must be one of"):  # built without parsing: still checked
        from astra_peft.harness.rank_allocation import AstraRunOptions

        AstraRunOptions(rank_allocation="erank")


def test_the_catalog_lists_the_option():
    from astra_peft.harness.method_catalog import CATALOG
    from astra_peft.harness.methods import METHODS

    astra = next(m for m in CATALOG if m.name == "astra")
    assert "rank_allocation" in astra.options() == sorted(METHODS["astra"].option_types())


# -------------------------------------------------------------------------------------------- the model


def test_budget_kept_and_ranks_follow_the_spectra(allocated):
    uniform = _build("astra")
    report = allocated.report["allocation"]
    ranks = _ranks(allocated.model)
    assert ranks == report["ranks"]
    # Every trainable parameter is a LoRA A or B: within uniform r=4's count, which is the recorded budget.
    assert _trainable(allocated.model) == report["adapter_parameters"] <= report["uniform_budget"]
    assert report["uniform_budget"] == _trainable(uniform.model)
    assert set(_ranks(uniform.model).values()) == {4}
    assert report["rank_min"] == min(ranks.values()) < max(ranks.values()) == report["rank_max"]
    # Layers of one shape whose spectra differ get different ranks somewhere, and a higher effective rank never
    # gets a lower rank.
    differ = False
    for suffix in LLAMA_TARGETS:
        names = sorted((n for n in ranks if n.endswith(suffix)), key=report["effective_ranks"].get)
        by_erank = [ranks[n] for n in names]
        assert by_erank == sorted(by_erank), suffix
        differ |= len(set(by_erank)) > 1
    assert differ


def test_outputs_unchanged_at_init(allocated):
    batch = make_batches(n_batches=1, seed=7)[0]
    delta = (logits(allocated.model.eval(), batch) - logits(tiny_llama(), batch)).abs().max()
    assert delta <= 1e-5
    # and Astra really wrote the adapters: B is not LoRA's zero
    layers = lora_layers(allocated.model, "default").values()
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in layers)


def test_restore_rebuilds_the_allocated_ranks_bit_for_bit(allocated, tmp_path):
    from astra_peft.harness.rank_allocation import check_restored_ranks
    from astra_peft.harness.restore import restore_initial_adapter

    allocated.model.save_pretrained(tmp_path / "init")
    restored = restore_initial_adapter(tiny_llama(), tmp_path / "init", "astra", allocated.mutates_base)
    assert _ranks(restored) == allocated.report["allocation"]["ranks"]
    expected, got = allocated.model.state_dict(), restored.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    wrong = dict(allocated.report["allocation"]["ranks"], **{"model.layers.0.self_attn.q_proj": 9})
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has LoRA rank \d+ but the rank "
                                         r"allocation gave it 9.*--force"):
        check_restored_ranks(restored, wrong, "here")


# ---------------------------------------------------------------------------------- a run, cut and resumed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_allocation")
    return {"llama": str(make_tiny_llama(root / "llama")), "gen": str(make_generation_jsonl(root / "gen.jsonl"))}


def test_interrupted_run_resumes_with_the_same_ranks(tiny, tmp_path, monkeypatch):
    """Ctrl-C at step 4 (checkpoint at 3): the rerun rebuilds the allocated model from adapter_init/ without
    calibrating or allocating again, and ends exactly where an uninterrupted run ends. Tampered records are
    refused, naming the layer."""
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    whole = finetune(tiny, tmp_path / "whole", method=ALLOCATED)
    allocation = whole["init_report"]["allocation"]
    assert allocation["rank_min"] < allocation["rank_max"]
    assert whole["trainable_parameters"] == allocation["adapter_parameters"] <= allocation["uniform_budget"]
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny, tmp_path / "cut", method=ALLOCATED, callbacks=[CtrlC()])

    def no_build(*args, **kwargs):
        raise AssertionError("the initialisation should have been restored, not recomputed")

    monkeypatch.setattr("astra_peft.harness.restore.build_method", no_build)
    # A record whose ranks differ from the saved adapter's is refused, not trained with other ranks.
    init = tmp_path / "cut" / "init.json"
    original = init.read_text()
    meta = json.loads(original)
    name = sorted(meta["report"]["allocation"]["ranks"])[0]
    meta["report"]["allocation"]["ranks"][name] += 1
    init.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"layer '{name}' has LoRA rank"):
        finetune(tiny, tmp_path / "cut", method=ALLOCATED)
    init.write_text(original)
    summary = finetune(tiny, tmp_path / "cut", method=ALLOCATED)
    assert summary["init_restored"] and summary["resumed_from"].endswith("checkpoint-3")
    assert summary["init_report"]["allocation"] == allocation
    assert summary["final"] == whole["final"]
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
