"""Calibration statistics: padding- and batch-invariant, the same through inputs or outputs, persistent."""

import pytest
import torch
from conftest import MODELS, lora_config, make_batches, peft_model, tiny_llama

from astra_peft import ActivationStats, AstraConfig, collect_activation_stats, initialize_astra_weights
from astra_peft.layers import lora_layers, weight_matrix

QUIET = dict(show_progress=False)
F64 = dict(accumulation_dtype="float64", **QUIET)


def _matrices(stats, model, statistic="covariance"):
    layers = {n: l.get_base_layer() for n, l in lora_layers(model, "default").items()} if hasattr(model, "peft_config") \
        else None
    out = {}
    for name in stats.layers:
        layer = layers[name] if layers else dict(model.named_modules())[name]
        out[name] = stats.output_statistic(name, statistic, weight_matrix(layer), layer.bias)
    return out


def test_padding_does_not_change_statistics():
    clean = make_batches(n_batches=2, pad_rows=False)
    # the same sequences with extra padding of garbage ids appended
    padded = []
    for b in clean:
        ids = torch.cat([b["input_ids"], torch.randint(1, 90, (4, 7))], dim=1)
        mask = torch.cat([b["attention_mask"], torch.zeros(4, 7, dtype=torch.long)], dim=1)
        padded.append({"input_ids": ids, "attention_mask": mask})
    model = tiny_llama()
    a = collect_activation_stats(model, clean, lora_config("llama"), AstraConfig(**F64))
    b = collect_activation_stats(model, padded, lora_config("llama"), AstraConfig(**F64))
    for name in a.layers:
        assert a.tokens(name) == b.tokens(name) == 160
    ma, mb = _matrices(a, model), _matrices(b, model)
    for name in ma:
        assert torch.allclose(ma[name], mb[name], atol=1e-10), name


def test_batch_size_does_not_change_subspace():
    eight = make_batches(n_batches=1, batch_size=8, seed=5)
    ones = [{k: v[i : i + 1] for k, v in eight[0].items()} for i in range(8)]
    # causal LM with right padding: each row's valid tokens don't depend on its batch mates
    bases = []
    for batches in (eight, ones):
        model = peft_model("llama")
        initialize_astra_weights(model, batches, AstraConfig(eigen_selection="largest", **F64))
        bases.append({n: l.lora_B["default"].weight.detach() for n, l in lora_layers(model, "default").items()})
    for name in bases[0]:
        b1, b8 = bases[0][name].double(), bases[1][name].double()
        assert torch.allclose(b1 @ b1.T, b8 @ b8.T, atol=1e-6), name


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("statistic", ["covariance", "second_moment"])
def test_input_and_output_paths_agree(family, statistic, batches):
    factory, _, _ = MODELS[family]
    model = factory()
    config = lora_config(family)
    via_in = collect_activation_stats(model, batches, config, AstraConfig(statistic_source="input", **F64))
    via_out = collect_activation_stats(model, batches, config, AstraConfig(statistic_source="output", **F64))
    assert {via_in.source(n) for n in via_in.layers} == {"input"}
    assert {via_out.source(n) for n in via_out.layers} == {"output"}
    mi, mo = _matrices(via_in, model, statistic), _matrices(via_out, model, statistic)
    for name in mi:
        # the outputs the model computes carry fp32 rounding (~1e-7 relative); the identity itself is exact
        scale = mo[name].abs().max()
        assert (mi[name] - mo[name]).abs().max() <= 1e-5 * scale, name
    # and so both paths initialise the same subspace
    bases = []
    for stats in (via_in, via_out):
        pm = peft_model(family)
        initialize_astra_weights(pm, stats=stats, astra_config=AstraConfig(eigen_selection="largest", statistic=statistic, **F64))
        bases.append({n: l.lora_B["default"].weight.double() for n, l in lora_layers(pm, "default").items()})
    for name in bases[0]:
        assert torch.allclose(bases[0][name] @ bases[0][name].T, bases[1][name] @ bases[1][name].T, atol=1e-6)


def test_auto_shares_one_input_gram_per_input(batches):
    stats = collect_activation_stats(tiny_llama(), batches, lora_config("llama"), AstraConfig(**QUIET))
    block = "model.layers.0."
    acc = {n[len(block):]: stats.layers[n].acc for n in stats.layers if n.startswith(block)}
    assert acc["self_attn.q_proj"] == acc["self_attn.k_proj"] == acc["self_attn.v_proj"]
    assert acc["mlp.gate_proj"] == acc["mlp.up_proj"]
    assert len(set(acc.values())) == 4  # qkv, o, gate/up, down
    # down_proj: d_out 32 < d_in 64, so its output Gram is the cheaper one
    assert stats.source(block + "mlp.down_proj") == "output"
    assert stats.source(block + "mlp.gate_proj") == "input"


def test_max_normalized_matches_authors_code(batches):
    """Appendix I: per sequence (batch size 1), divide by torch.max(out).abs(), sum YᵀY, average."""
    model = tiny_llama()
    name = "model.layers.1.mlp.up_proj"
    layer = dict(model.named_modules())[name]
    total, count = 0, 0
    with torch.no_grad():
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                keep = batch["attention_mask"][row].bool()
                seq = {k: v[row : row + 1, : int(keep.sum())] for k, v in batch.items()}
                out = {}
                h = layer.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
                model(**seq)
                h.remove()
                y = out["y"][0].double()
                y = y / torch.max(y).abs()
                total, count = total + y.T @ y, count + 1
    expected = total / count
    stats = collect_activation_stats(model, batches, lora_config("llama"), AstraConfig(statistic="max_normalized", **F64))
    got = stats.output_statistic(name, "max_normalized")
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()  # fp32 activations, other batch shapes
    with pytest.raises(ValueError, match="max_normalized"):
        stats.output_statistic(name, "covariance")


def test_stats_save_load_roundtrip_and_reuse(tmp_path, batches):
    stats = collect_activation_stats(tiny_llama(), batches, lora_config("llama"), AstraConfig(**QUIET))
    path = tmp_path / "sub" / "stats.safetensors"
    stats.save(path)
    assert not [p for p in path.parent.iterdir() if p.name != "stats.safetensors"]  # no temp left behind
    loaded = ActivationStats.load(path)
    assert loaded.fingerprint == stats.fingerprint
    for a, b in zip(stats.accumulators, loaded.accumulators):
        assert torch.equal(a.gram, b.gram) and torch.equal(a.sum, b.sum) and a.tokens == b.tokens
    # one calibration, two initialisations: identical to calibrating inside initialize_astra_weights
    direct, reused = peft_model("llama"), peft_model("llama")
    initialize_astra_weights(direct, batches, AstraConfig(**QUIET))
    initialize_astra_weights(reused, stats=loaded, astra_config=AstraConfig(**QUIET))
    for (n, a), (_, b) in zip(lora_layers(direct, "default").items(), lora_layers(reused, "default").items()):
        assert torch.allclose(a.lora_B["default"].weight, b.lora_B["default"].weight, atol=1e-6), n
    # the file is safetensors with metadata, never pickle
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "astra-peft-activation-stats"


def test_stats_from_base_model_apply_to_peft_model(batches):
    stats = collect_activation_stats(tiny_llama(), batches, lora_config("llama"), AstraConfig(**QUIET))
    model = peft_model("llama")
    report = initialize_astra_weights(model, stats=stats, astra_config=AstraConfig(**QUIET))
    assert len(report.layers) == 14


def test_calibration_on_peft_model_ignores_trained_adapter(batches):
    """Stats describe the base model even if the PeftModel's adapter is already non-zero."""
    base_stats = collect_activation_stats(tiny_llama(), batches, lora_config("llama"), AstraConfig(**F64))
    model = peft_model("llama")
    for layer in lora_layers(model, "default").values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    peft_stats = collect_activation_stats(model, batches, None, AstraConfig(**F64))
    for a, b in zip(base_stats.accumulators, peft_stats.accumulators):
        assert torch.allclose(a.gram, b.gram, rtol=1e-10)


def test_gram_strips_fill_the_upper_triangle_exactly():
    """Wide layers accumulate xᵀx in strips above the diagonal (5/8 of the multiply-adds); after symmetrising it
    is the full product. The tiny test models are too narrow to take this path, hence the direct check."""
    from astra_peft._collector import _add_upper_gram

    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(50, 301, generator=g, dtype=torch.float64) for _ in range(2))
    gram = torch.zeros(301, 301, dtype=torch.float64)
    _add_upper_gram(gram, x1)
    _add_upper_gram(gram, x2)
    full = torch.triu(gram) + torch.triu(gram, 1).T
    assert torch.allclose(full, x1.T @ x1 + x2.T @ x2, atol=1e-10)


# ------------------------------------------------------------------------------ no hook left behind, ever


def _hooks(model):
    """Every forward hook and pre-hook on any module of `model` (ids by module name), and the global ones."""
    from torch.nn.modules import module as torch_module

    found = {}
    for name, module in model.named_modules():
        ids = sorted(module._forward_hooks) + sorted(module._forward_pre_hooks)
        if ids:
            found[name] = ids
    found["<global>"] = sorted(torch_module._global_forward_hooks) + sorted(torch_module._global_forward_pre_hooks)
    return found


class _Boom(RuntimeError):
    pass


def _failing_after(batches, n):
    """The batches, then an exception in place of batch `n`: a data pipeline failing mid-calibration."""
    for i, batch in enumerate(batches):
        if i == n:
            raise _Boom(f"batch {n}")
        yield batch


@pytest.mark.parametrize("source", ["auto", "input", "output"])
def test_calibration_leaves_no_hook_after_success(source, batches):
    model = tiny_llama()
    before = _hooks(model)
    collect_activation_stats(model, batches, lora_config("llama"), AstraConfig(statistic_source=source, **QUIET))
    assert _hooks(model) == before


@pytest.mark.parametrize("source", ["auto", "input", "output"])
def test_calibration_leaves_no_hook_after_failing_midway(source, batches):
    model = tiny_llama()
    before = _hooks(model)
    seen = []

    def forward_fn(m, batch):  # counts the passes that ran with the statistics hooks on
        seen.append(1)
        return m(**batch)

    with pytest.raises(_Boom):
        collect_activation_stats(model, _failing_after(batches, 2), lora_config("llama"),
                                 AstraConfig(statistic_source=source, **QUIET), forward_fn=forward_fn)
    assert len(seen) >= 2  # it did fail mid-way, with hooks registered, not before the first batch
    assert _hooks(model) == before


def test_calibration_leaves_no_hook_when_the_forward_itself_fails(batches):
    """A model that raises inside its forward: the probe for shared inputs and the collection both fail."""
    model = tiny_llama()
    before = _hooks(model)

    def forward_fn(m, batch):
        m(**batch)
        raise _Boom("after the forward, with every hook fired")

    with pytest.raises(_Boom):
        collect_activation_stats(model, batches, lora_config("llama"), AstraConfig(**QUIET), forward_fn=forward_fn)
    assert _hooks(model) == before


def test_initialisation_leaves_no_hook_and_no_change_after_failing(batches):
    """initialize_astra_weights failing during its calibration (non-finite activations, raised from inside a
    hook) and after it (too few tokens): no hook left, weights as they were."""
    model = peft_model("llama")
    norm = model.get_base_model().model.layers[1].input_layernorm
    poison = norm.register_forward_hook(lambda m, a, out: out * float("nan"))
    before = _hooks(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError):
        initialize_astra_weights(model, batches, AstraConfig(**QUIET))
    assert _hooks(model) == before
    poison.remove()
    before = _hooks(model)
    with pytest.raises(ValueError, match="calibration tokens"):
        initialize_astra_weights(model, make_batches(n_batches=1, batch_size=1, pad_rows=False), AstraConfig(**QUIET))
    assert _hooks(model) == before
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshot[key]), key


def test_effective_ranks_leave_no_hook(batches):
    from astra_peft import effective_ranks

    model = peft_model("llama")
    before = _hooks(model)
    effective_ranks(model, batches)
    assert _hooks(model) == before
    with pytest.raises(_Boom):
        effective_ranks(model, _failing_after(batches, 1))
    assert _hooks(model) == before


def test_the_hook_check_sees_a_hook():
    # _hooks must be able to fail: a hook left on one layer shows up under that layer's name
    model = tiny_llama()
    before = _hooks(model)
    handle = model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: None)
    assert _hooks(model) != before and "model.layers.0.mlp.up_proj" in _hooks(model)
    handle.remove()
    assert _hooks(model) == before


@pytest.mark.parametrize("family", list(MODELS))
def test_all_linear_on_a_plain_model_picks_the_layers_peft_wraps(family):
    """target_modules="all-linear" on a plain model is expanded by PEFT's own (private) helper,
    `_maybe_include_all_linear_layers` (layers.target_base_layers): the layers calibrated must be exactly the ones
    get_peft_model wraps for the same config, output heads left out. This pins that private import's behaviour."""
    from peft import LoraConfig, get_peft_model

    from astra_peft.layers import target_base_layers

    factory, _, extra = MODELS[family]
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **extra)
    wrapped = lora_layers(get_peft_model(factory(), config), "default")
    assert set(target_base_layers(factory(), config)) == set(wrapped) and len(wrapped) > 0
    if family == "llama":  # and the calibration itself follows it
        stats = collect_activation_stats(factory(), make_batches(), config, AstraConfig(**QUIET))
        assert set(stats.layers) == set(wrapped)


@pytest.mark.parametrize("statistic, layer", [("covariance", "self_attn.k_proj"), ("max_normalized", "mlp.up_proj")])
def test_a_group_that_stops_sharing_its_input_is_refused(statistic, layer, batches):
    # The probe sees q/k/v (gate/up) read one tensor; from the next forward on, a user hook hands one of them a copy.
    # The shared statistic would then silently describe another input: both hook kinds must refuse, naming the layer.
    model = tiny_llama()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    module = model.get_submodule(f"model.layers.0.{layer}")
    module.register_forward_pre_hook(lambda m, args: (args[0].clone(),) if len(forwards) > 1 else None)
    config = AstraConfig(statistic=statistic, show_progress=False)
    with pytest.raises(RuntimeError, match=rf"'model.layers.0.{layer}' shared its input with its group during probing"):
        collect_activation_stats(model, batches, lora_config("llama"), config)
