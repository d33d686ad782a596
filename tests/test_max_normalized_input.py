"""statistic='max_normalized' kept on a layer's inputs (each sequence weighted by 1/m_s², m_s from its outputs)
gives the output-Gram statistic, the same Astra B and A, and unchanged outputs, on every tiny family."""

import pytest
import torch
from conftest import MODELS, lora_config

from astra_peft import ActivationStats, AstraConfig, collect_activation_stats, initialize_astra_weights
from astra_peft.layers import lora_layers, out_in_dims, weight_matrix

F64 = dict(accumulation_dtype="float64", show_progress=False)


def _model(family):
    return MODELS[family][0]().double()


def _peft(family, r=4):
    from peft import get_peft_model

    return get_peft_model(_model(family), lora_config(family, r=r))


def _stats(model, family, source, batches):
    config = AstraConfig(statistic="max_normalized", statistic_source=source, **F64)
    return collect_activation_stats(model, batches, lora_config(family), config)


@pytest.mark.parametrize("family", list(MODELS))
def test_weighted_input_gram_equals_the_output_gram(family, batches):
    model = _model(family)
    layers = dict(model.named_modules())
    via_in, via_out = _stats(model, family, "auto", batches), _stats(model, family, "output", batches)
    kinds = {via_in.source(n) for n in via_in.layers}
    assert kinds == {"max_normalized", "max_normalized_input"}  # both, chosen per layer by cost
    assert {via_out.source(n) for n in via_out.layers} == {"max_normalized"}
    if family == "llama":  # gate/up read one input: its per-sequence Grams serve both, each with its own m_s
        pair = [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up")]
        assert {via_in.source(n) for n in pair} == {"max_normalized_input"}
        assert len({via_in.layers[n].acc for n in pair}) == 2
    for name in via_in.layers:
        d_out, d_in = out_in_dims(layers[name])
        assert (via_in.source(name) == "max_normalized_input") == (d_in + 1 < d_out), name
        assert via_in.tokens(name) == via_out.tokens(name) == int(sum(b["attention_mask"].sum() for b in batches))
        expected = via_out.output_statistic(name, "max_normalized")
        layer = layers[name]
        for got in (via_in.output_statistic(name, "max_normalized"),  # weight read from the calibrated module
                    via_in.output_statistic(name, "max_normalized", weight_matrix(layer), layer.bias)):
            assert (got - expected).abs().max() <= 1e-10 * expected.abs().max(), name


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("selection", ["smallest", "largest"])
def test_same_astra_init_and_unchanged_outputs(family, selection, batches):
    inits = []
    for source in ("auto", "output"):
        pm = _peft(family)
        with torch.no_grad():
            before = pm(**batches[0]).logits
        config = AstraConfig(statistic="max_normalized", statistic_source=source, eigen_selection=selection, **F64)
        report = initialize_astra_weights(pm, batches, config)
        sources = {layer.source for layer in report.layers}
        assert ("max_normalized_input" in sources) == (source == "auto")
        with torch.no_grad():
            after = pm(**batches[0]).logits
        # outputs unchanged at init, to the float32 rounding of the residual W − s·B·A (`initialization._write`)
        assert (after - before).abs().max() <= 1e-6 * before.abs().max()
        inits.append({n: (l.lora_B["default"].weight.detach().clone(), l.lora_A["default"].weight.detach().clone())
                      for n, l in lora_layers(pm, "default").items()})
    for name, (b_in, a_in) in inits[0].items():
        b_out, a_out = inits[1][name]
        # null-space directions are chosen from the projector, so even the degenerate columns agree
        assert (b_in - b_out).abs().max() <= 1e-10, name
        assert (a_in - a_out).abs().max() <= 1e-6 * a_out.abs().max(), name  # A = QᵀW is formed in float32


def test_save_load_roundtrip_needs_the_weight_after_loading(tmp_path, batches):
    model = _model("llama")
    stats = _stats(model, "llama", "auto", batches)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = ActivationStats.load(path)
    for a, b in zip(stats.accumulators, loaded.accumulators):
        assert a.kind == b.kind and torch.equal(a.gram, b.gram) and torch.equal(a.sum, b.sum)
        assert (a.tokens, a.sequences) == (b.tokens, b.sequences)
    name = "model.layers.0.mlp.gate_proj"
    assert loaded.source(name) == "max_normalized_input"
    layer = dict(model.named_modules())[name]
    assert torch.equal(loaded.output_statistic(name, "max_normalized", weight_matrix(layer), layer.bias),
                       stats.output_statistic(name, "max_normalized"))
    with pytest.raises(ValueError, match=f"Layer '{name}'.*pass weight="):
        loaded.output_statistic(name, "max_normalized")  # a loaded file holds no module to read the weight from
    # the weight of a changed module is not used silently either
    with torch.no_grad():
        layer.weight.mul_(2)
    with pytest.raises(ValueError, match="pass weight="):
        stats.output_statistic(name, "max_normalized")


def test_initialisation_from_saved_weighted_statistics_matches(tmp_path, batches):
    from peft import get_peft_model

    direct, reused = _peft("llama"), _peft("llama")
    config = AstraConfig(statistic="max_normalized", **F64)
    stats = collect_activation_stats(get_peft_model(_model("llama"), lora_config("llama")), batches,
                                     lora_config("llama"), config)
    stats.save(tmp_path / "s.safetensors")
    initialize_astra_weights(direct, batches, config)
    initialize_astra_weights(reused, stats=ActivationStats.load(tmp_path / "s.safetensors"), astra_config=config)
    for (n, a), (_, b) in zip(lora_layers(direct, "default").items(), lora_layers(reused, "default").items()):
        assert torch.equal(a.lora_B["default"].weight, b.lora_B["default"].weight), n


def test_without_padding_both_paths_match_the_definition():
    """No attention_mask padding (the rows are views, the max taken without a masked copy): both paths equal
    Σ_s (y_s / |max y_s|)ᵀ(y_s / |max y_s|) / S computed directly."""
    from conftest import make_batches

    batches = make_batches(n_batches=2, pad_rows=False)
    model = _model("llama")
    outputs = {}
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]  # a weighted-input and an output layer
    layers = dict(model.named_modules())
    handles = [layers[n].register_forward_hook(lambda m, a, o, n=n: outputs.setdefault(n, []).append(o.detach()))
               for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    via_in, via_out = _stats(model, "llama", "auto", batches), _stats(model, "llama", "output", batches)
    assert [via_in.source(n) for n in names] == ["max_normalized_input", "max_normalized"]
    for name in names:
        ys = [y for batch in outputs[name] for y in batch]
        expected = sum((y / y.max().abs()).T @ (y / y.max().abs()) for y in ys) / len(ys)
        for stats in (via_in, via_out):
            got = stats.output_statistic(name, "max_normalized")
            assert (got - expected).abs().max() <= 1e-10 * expected.abs().max(), name
