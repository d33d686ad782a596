"""The two pre-registered Astra variants of issue 15 §6 (AstraConfig.factor_init, experimental), on `largest`'s B = Q:
S ('lora_scale': A = c·QᵀW at LoRA's row norm √(1/3), residual as always) and D ('zero_a': A = 0, W untouched).
Outputs unchanged at init, the factors as specified, every save/load/conversion route exact, refusals where a
route cannot honour the variant, and the harness building both from a spec."""

import json

import pytest
import torch
from conftest import MODELS, logits, make_batches, peft_model
from peft import PeftModel

from astra_peft import AstraConfig, initialize_astra_weights, save_as_lora
from astra_peft.layers import lora_layers
from astra_peft.rewrite import residual_weight

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "gpt2"]
VARIANTS = ["lora_scale", "zero_a"]
ROW_NORM = (1 / 3) ** 0.5


def _config(factor_init, selection="largest"):
    return AstraConfig(eigen_selection=selection, factor_init=factor_init, show_progress=False)


def _initialised(family, factor_init, selection="largest"):
    model = peft_model(family).eval()
    report = initialize_astra_weights(model, make_batches(), _config(factor_init, selection))
    return model, report


def _w(layer):
    """The base weight as (d_out, d_in), whatever the layer stores (Conv1D stores Wᵀ)."""
    from transformers.pytorch_utils import Conv1D

    w = layer.get_base_layer().weight.detach()
    return w.T if isinstance(layer.get_base_layer(), Conv1D) else w


def _train_a_little(model):
    g = torch.Generator().manual_seed(7)
    for layer in lora_layers(model, "default").values():
        for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            w.data += 0.05 * torch.randn(w.shape, generator=g)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("factor_init", VARIANTS)
def test_outputs_unchanged_at_init(family, factor_init):
    batch = make_batches()[0]
    reference = logits(MODELS[family][0](), batch)
    model, _ = _initialised(family, factor_init)
    assert (logits(model, batch) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_scale_a_has_loras_row_norm_and_b_a_is_what_left_w(family):
    original = {n: _w(l).clone() for n, l in lora_layers(peft_model(family), "default").items()}
    model, report = _initialised(family, "lora_scale")
    assert report.unscaled_layers == []
    for name, layer in lora_layers(model, "default").items():
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        rms = float(a.double().norm()) / a.shape[0] ** 0.5
        assert abs(rms - ROW_NORM) <= 1e-5, name
        assert torch.allclose(b.T @ b, torch.eye(b.shape[1]), atol=1e-5)  # B = Q, orthonormal
        # B·A is what was subtracted from W, formed as the library's one rewrite forms it: bit for bit
        assert torch.equal(_w(layer), residual_weight(original[name], a, b, layer.scaling["default"])), name
        # and A = c·QᵀW: proportional to the paper's A, by the c the report gives
        info = next(i for i in report.layers if i.name == name)
        assert torch.allclose(a, info.a_scale * (b.T @ original[name]), atol=1e-5)
        assert getattr(layer, "astra_adapters", ()) == {"default"}  # a residual base, marked as such


def test_lora_scale_leaves_a_numerically_zero_a_unscaled():
    """`smallest` on LLaMA's gate/up selects only left-null-space directions (d_out > d_in): QᵀW is rounding
    noise there, which must not be blown up to LoRA's row norm. Those layers keep c = 1 and say so."""
    scaled, report = _initialised("llama", "lora_scale", "smallest")
    exact, _ = _initialised("llama", "exact", "smallest")
    unscaled = set(report.unscaled_layers)
    assert unscaled == {n for n in lora_layers(scaled, "default") if n.endswith(("gate_proj", "up_proj"))}
    assert f"{len(unscaled)} layers left unscaled" in report.summary()
    exact_layers = lora_layers(exact, "default")
    for name, layer in lora_layers(scaled, "default").items():
        info = next(i for i in report.layers if i.name == name)
        a = layer.lora_A["default"].weight.detach()
        if name in unscaled:
            assert info.a_scale == 1.0 and info.a_unscaled
            assert torch.equal(a, exact_layers[name].lora_A["default"].weight.detach())
            assert float(a.norm()) < 1e-5
        else:
            assert abs(float(a.double().norm()) / a.shape[0] ** 0.5 - ROW_NORM) <= 1e-5


def test_lora_scale_tolerance_guards_noise_even_where_no_direction_is_flagged_degenerate():
    """The float32 rounding of QᵀW (≤ max(d_out, d_in)·eps·‖W‖_F) is never scaled up, whatever the spectrum said."""
    from astra_peft.initialization import _lora_scale

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g)
    q = torch.linalg.qr(torch.randn(64, 4, generator=g))[0]
    a = q.T @ w
    c, unscaled = _lora_scale(a, w, False)
    assert not unscaled and abs(float((c * a).norm()) / 2 - ROW_NORM) <= 1e-6  # 4 rows: rms = ‖A‖_F / 2
    assert _lora_scale(1e-9 * a, w, False) == (1.0, True)  # below the rounding bound
    assert _lora_scale(a, w, True) == (1.0, True)  # every selected direction degenerate


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_a_leaves_every_base_weight_bit_identical(family):
    reference = MODELS[family][0]().state_dict()
    model, report = _initialised(family, "zero_a")
    assert "A = 0, base weights untouched" in report.summary()
    base = model.get_base_model().state_dict()
    for key, value in reference.items():
        wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        live = base.get(key, base.get(wrapped))
        assert live is not None and torch.equal(live, value), key
    for name, layer in lora_layers(model, "default").items():
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert torch.count_nonzero(a) == 0, name
        assert torch.allclose(b.T @ b, torch.eye(b.shape[1]), atol=1e-5), name
        assert not getattr(layer, "astra_adapters", ())  # no residual: nothing may treat the base as one


def test_zero_a_model_can_be_initialised_again_since_nothing_was_subtracted():
    model, _ = _initialised("llama", "zero_a")
    reference = logits(MODELS["llama"][0](), make_batches()[0])
    initialize_astra_weights(model, make_batches(), _config("exact"))  # would stack a residual after S or exact
    assert (logits(model, make_batches()[0]) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("factor_init", VARIANTS)
def test_save_load_and_save_as_lora_round_trips(family, factor_init, tmp_path):
    factory = MODELS[family][0]
    model, _ = _initialised(family, factor_init)
    model.save_pretrained(tmp_path / "init")
    _train_a_little(model)
    batch = make_batches()[0]
    expected = logits(model, batch)

    # the adapter on the base it was trained on: the residual for S, the untouched original for D
    model.save_pretrained(tmp_path / "adapter")
    if factor_init == "zero_a":
        base = factory()
    else:
        import copy

        copy.deepcopy(model).unload().save_pretrained(tmp_path / "residual_base")
        base = type(model.get_base_model()).from_pretrained(tmp_path / "residual_base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (logits(reloaded, batch) - expected).abs().max() <= 1e-5

    # the plain-LoRA conversion onto the ORIGINAL base
    save_as_lora(model, tmp_path / "lora", tmp_path / "init")
    converted = PeftModel.from_pretrained(factory(), tmp_path / "lora").eval()
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * model.peft_config["default"].r
    assert (logits(converted, batch) - expected).abs().max() <= 1e-4


def test_config_refuses_a_bad_factor_init():
    with pytest.raises(ValueError, match=r"AstraConfig\.factor_init must be one of .*'zero_a'.*got 'zero'"):
        AstraConfig(factor_init="zero")
    from astra_peft.harness.specs import parse_method_spec

    with pytest.raises(ValueError, match="bad value 'zero' for factor_init: choose one of exact, lora_scale, zero_a"):
        parse_method_spec("astra:eigen_selection=largest:factor_init=zero")


# ------------------------------------------------------------------------------------------------ the harness


def _context(model):
    from astra_peft.harness.methods import BuildContext

    calibration = make_batches(pad_rows=False)
    return BuildContext(model=model, task_kind="generation", target_modules=MODELS["llama"][1], rank=4, alpha=7,
                        calibration_batches=lambda: iter(calibration), progress=False)


@pytest.mark.parametrize("factor_init,rewrites", [("lora_scale", True), ("zero_a", False)])
def test_harness_builds_and_restores_each_variant_from_its_spec(factor_init, rewrites, tmp_path):
    from astra_peft.harness.methods import build_method
    from astra_peft.harness.restore import restore_initial_adapter
    from astra_peft.harness.specs import parse_method_spec

    factory = MODELS["llama"][0]
    spec = parse_method_spec(f"astra:eigen_selection=largest:factor_init={factor_init}:lr=2e-3")
    assert spec.method_config().factor_init == factor_init
    built = build_method(spec, _context(factory()))
    assert built.mutates_base is rewrites  # a D run's adapter fits the original base: no conversion, no rebuild
    model = built.model.eval()
    batch = make_batches()[0]
    assert (logits(model, batch) - logits(factory(), batch)).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "init")
    restored = restore_initial_adapter(factory(), tmp_path / "init", spec, built.mutates_base).eval()
    expected, got = model.state_dict(), restored.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    if not rewrites:  # by name alone the record and Astra's declared rewrite disagree: refused, not guessed
        with pytest.raises(ValueError, match="mutates_base=False"):
            restore_initial_adapter(factory(), tmp_path / "init", "astra", False)


def test_the_catalog_lists_factor_init():
    from astra_peft.harness.method_catalog import CATALOG

    assert "factor_init" in next(m for m in CATALOG if m.name == "astra").options()


# ------------------------------------------------------------------------------- routes that refuse or pass


def test_quantized_routes_refuse_what_they_cannot_honour(tmp_path):
    pytest.importorskip("bitsandbytes")
    from astra_peft.quantized import initialize_astra_on_quantized, save_for_quantized_base

    model, _ = _initialised("llama", "zero_a")
    with pytest.raises(ValueError, match=r"factor_init='zero_a'\) has no residual either"):
        save_for_quantized_base(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    fresh = peft_model("llama")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for factor_init in VARIANTS:
        with pytest.raises(ValueError, match=f"does not support factor_init='{factor_init}'"):
            initialize_astra_on_quantized(fresh, MODELS["llama"][0](), make_batches(), _config(factor_init))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_trainer_integration_with_zero_a_keeps_the_base_and_saves_a_plain_lora(tmp_path):
    """D through the Trainer bookkeeping unchanged: its A₀ = 0, so the 'residual' is the original base itself;
    restoring it for a resume changes no weight, and the saved plain LoRA reproduces the trained model."""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from astra_peft.integrations import initialize_astra_for_trainer, restore_astra_initialization
    from conftest import lora_config, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    texts = [f"the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(24)]
    ds = Dataset.from_dict({"text": texts}).map(lambda r: tok(r["text"]), remove_columns=["text"])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, seed=0, save_strategy="no", logging_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=get_peft_model(tiny_llama(), lora_config("llama")), args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    reference = tiny_llama().state_dict()
    initialize_astra_for_trainer(trainer, _config("zero_a"), num_batches=4)
    base = trainer.model.get_base_model().state_dict()
    assert all(torch.equal(base.get(k, base.get(k.replace(".weight", ".base_layer.weight"))), v)
               for k, v in reference.items())
    trainer.train()
    probe = dict(tok(["the number 7 is odd.", "the number 12 is"], padding=True, return_tensors="pt"))
    trainer.model.eval()
    trained = logits(trainer.model, probe)
    assert (trained - logits(tiny_llama(), probe)).abs().max() > 1e-3  # training moved the model
    trainer.save_model(str(tmp_path / "final"))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final")).eval()
    assert (logits(loaded, probe) - trained).abs().max() <= 1e-5

    restored = get_peft_model(tiny_llama(), lora_config("llama"))
    restore_astra_initialization(restored, tmp_path / "run" / "astra_init")
    base = restored.get_base_model().state_dict()
    assert all(torch.equal(base.get(k, base.get(k.replace(".weight", ".base_layer.weight"))), v)
               for k, v in reference.items())
