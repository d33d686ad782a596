"""Save/reload, merge, and conversion to a plain LoRA adapter for the ORIGINAL base model."""

import copy
import json

import pytest
import torch
from conftest import MODELS, logits, make_batches, peft_model
from peft import PeftModel

from astra_peft import AstraConfig, initialize_astra_weights, load_residual_adapter
from astra_peft.layers import lora_layers

QUIET = dict(show_progress=False)


def _initialised(family):
    model = peft_model(family)
    model.eval()
    initialize_astra_weights(model, make_batches(), AstraConfig(**QUIET))
    return model


def _train_a_little(model):
    """Stand-in for training: move every adapter weight, so the adapter really differs from its init."""
    g = torch.Generator().manual_seed(7)
    for layer in lora_layers(model, "default").values():
        for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            w.data += 0.05 * torch.randn(w.shape, generator=g)


@pytest.mark.parametrize("family", list(MODELS))
def test_save_and_reload_residual_base_plus_adapter(family, tmp_path):
    model = _initialised(family)
    _train_a_little(model)
    batch = make_batches()[0]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "residual_base")
    base = type(model.get_base_model()).from_pretrained(tmp_path / "residual_base")
    reloaded = load_residual_adapter(base, tmp_path / "adapter").eval()
    assert (logits(reloaded, batch) - expected).abs().max() <= 1e-5
    # marked again: saved from here it still says it needs this base, and Astra will not stack a second residual
    reloaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["init_lora_weights"] == "astra"
    with pytest.raises(RuntimeError, match="already initialised by Astra"):
        initialize_astra_weights(reloaded, make_batches(), AstraConfig(**QUIET))


@pytest.mark.parametrize("family", list(MODELS))
def test_residual_form_adapter_is_refused_on_the_original_base(family, tmp_path):
    """What `save_pretrained` writes after Astra fits only the residual base. Before its config was marked, PEFT
    loaded it onto the original model without a word and the outputs were wrong."""
    model = _initialised(family)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "astra"
    with pytest.raises(ValueError, match="astra"):
        PeftModel.from_pretrained(MODELS[family][0](), tmp_path / "adapter")


def test_the_initialised_config_still_makes_adapters(tmp_path):
    """Only the saved config is marked: making another adapter from the live one (TRL's frozen "ref" copy does)
    still works, and PEFT's own conversion for the original base still writes an ordinary config."""
    model = _initialised("llama")
    model.add_adapter("copy", model.peft_config["default"])
    assert lora_layers(model, "copy")


@pytest.mark.parametrize("family", list(MODELS))
def test_merge_and_unload(family):
    model = _initialised(family)
    _train_a_little(model)
    batch = make_batches()[0]
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert (logits(merged, batch) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family", list(MODELS))
def test_trained_adapter_converts_to_plain_lora_on_the_original_base(family, tmp_path):
    factory = MODELS[family][0]
    model = _initialised(family)
    model.save_pretrained(tmp_path / "init")  # right after initialisation
    _train_a_little(model)
    batch = make_batches()[0]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    converted = PeftModel.from_pretrained(factory(), tmp_path / "lora").eval()  # the untouched original
    r = model.peft_config["default"].r
    assert converted.peft_config["default"].r == 2 * r
    assert (logits(converted, batch) - expected).abs().max() <= 1e-4


def test_conversion_keeps_a_trained_classification_head(tmp_path):
    """PEFT's conversion drops modules_to_save; save_as_lora writes the trained head back."""
    from astra_peft.conversion import save_as_lora

    factory = MODELS["bert"][0]
    model = peft_model("bert", modules_to_save=["classifier"])
    model.eval()
    initialize_astra_weights(model, make_batches(), AstraConfig(**QUIET))
    model.save_pretrained(tmp_path / "init")
    _train_a_little(model)
    head = model.base_model.model.classifier.modules_to_save["default"]
    head.weight.data += 0.5  # a trained head, unlike the base model's
    batch = make_batches()[0]
    expected = logits(model, batch)

    model.save_pretrained(tmp_path / "peft_only", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    from safetensors.torch import load_file

    assert not any("classifier" in k for k in load_file(tmp_path / "peft_only" / "adapter_model.safetensors"))

    save_as_lora(model, tmp_path / "lora", tmp_path / "init")
    converted = PeftModel.from_pretrained(factory(), tmp_path / "lora").eval()
    assert (logits(converted, batch) - expected).abs().max() <= 1e-4


# ------------------------------------------------------------------ every method's base, rebuilt from its init

PEFT_METHODS = ["lora", "rslora", "dora", "pissa", "olora", "milora", "astra", "eva", "corda", "lora-ga"]


def _build_context(model):
    from astra_peft.harness.methods import BuildContext

    calibration = make_batches(pad_rows=False)

    def with_labels():
        return [{**b, "labels": b["input_ids"].clone()} for b in calibration]

    # alpha 7, scaling 7/4: with a power of two the two float32 orders of s·B·A round alike and cannot be told apart
    return BuildContext(model=model, task_kind="generation", target_modules=MODELS["llama"][1], rank=4, alpha=7,
                        calibration_batches=lambda: iter(calibration), gradient_batches=with_labels)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_method_rebuilds_its_base_bit_for_bit(method, tmp_path):
    """What resuming a run relies on: the initial adapter saved by the harness, loaded onto the ORIGINAL base
    and rebuilt as the method's declared `BaseRebuild` says, gives the very weights the method built, bit for
    bit; and the model starts where the base model was (every method here promises unchanged outputs at init).
    A method registered with the wrong `base=` fails here: KEEP for a method that rewrites W misses B₀A₀ in
    the base, and the wrong float32 order rounds some entries differently."""
    from astra_peft.harness.methods import METHODS, build_method
    from astra_peft.harness.restore import restore_initial_adapter
    from astra_peft.harness.specs import parse_method_spec

    factory = MODELS["llama"][0]
    batch = make_batches()[0]
    reference = logits(factory(), batch)
    torch.manual_seed(0)
    built = build_method(parse_method_spec(method), _build_context(factory()))
    assert built.mutates_base == METHODS[method].base.rewrites_base
    model = built.model.eval()
    assert (logits(model, batch) - reference).abs().max() <= 1e-4
    model.save_pretrained(tmp_path / "init")
    restored = restore_initial_adapter(factory(), tmp_path / "init", method, built.mutates_base).eval()
    expected, got = model.state_dict(), restored.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    if METHODS[method].base.rewrites_base:  # and the check above really looked at a rewritten base
        layer = next(iter(lora_layers(model, "default").values()))
        assert not torch.equal(layer.get_base_layer().weight, factory().model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("order", ["product", "scaled_b"])
def test_subtract_adapters_takes_s_b_a_out_of_every_base(family, order):
    """rewrite.subtract_adapters, the one W ← W − s·B·A: in the (d_out, d_in) convention whatever the layer stores
    (GPT-2's Conv1D keeps Wᵀ), rounded in the order asked, and the model's outputs stay where they were."""
    from astra_peft.layers import weight_matrix
    from astra_peft.rewrite import residual_weight, subtract_adapters

    model = peft_model(family, r=4, alpha=7).eval()
    _train_a_little(model)  # a non-zero B·A in every layer
    batch = make_batches()[0]
    with model.disable_adapter():
        base_logits = logits(model, batch)  # W alone
    layers = lora_layers(model, "default")
    originals = {n: weight_matrix(l.get_base_layer()).detach().clone() for n, l in layers.items()}
    assert subtract_adapters(model, "default", order) == len(layers) > 0
    for name, layer in layers.items():
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        assert torch.equal(weight_matrix(layer.get_base_layer()), residual_weight(originals[name], a, b, s, order))
    # the base now holds W − s·BA, so with the adapter on the model computes W again
    assert (logits(model, batch) - base_logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="order"):
        residual_weight(originals[name], a, b, s, "sideways")
