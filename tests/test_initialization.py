"""Astra's initialisation: outputs identical at init, B spans the right eigenvectors, A = BᵀW."""

import numpy as np
import pytest
import torch
from conftest import MODELS, lora_config, logits, make_batches, peft_model, tiny_llama
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

from astra_peft import AstraConfig, initialize_astra_weights
from astra_peft.layers import lora_layers, weight_matrix
from astra_peft.spectrum import selection_indices

QUIET = dict(show_progress=False)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("selection", ["smallest", "largest"])
def test_outputs_unchanged_at_init(family, selection, batches):
    model = peft_model(family)
    before = logits(model, batches[0])
    initialize_astra_weights(model, batches, AstraConfig(eigen_selection=selection, **QUIET))
    after = logits(model, batches[0])
    assert (after - before).abs().max() <= 1e-4
    # and the adapter is really non-trivial
    layer = next(iter(lora_layers(model, "default").values()))
    assert layer.lora_B["default"].weight.abs().sum() > 0


def test_bf16_model_residual_is_cast_once(batches):
    """The residual is formed in fp32 from the cast A and B, then cast once to bf16.

    Observed on the tiny LLaMA: max |Δlogits| ≈ 1e-2 against the same bf16 model before initialisation
    (bf16 keeps ~3 significant digits; logits are O(1)); the bound below leaves a factor ~3 of slack.
    """
    from peft import LoraConfig

    # alpha 7 (scaling 7/4): with a power-of-two scaling s·B·A is exact and would hide a wrongly formed residual
    model = get_peft_model(tiny_llama(torch.bfloat16), LoraConfig(r=4, lora_alpha=7, target_modules=["q_proj", "gate_proj", "down_proj"]))
    originals = {n: weight_matrix(l.get_base_layer()).detach().float().clone() for n, l in lora_layers(model, "default").items()}
    before = logits(model, batches[0]).float()
    initialize_astra_weights(model, batches, AstraConfig(**QUIET))
    after = logits(model, batches[0]).float()
    err = (after - before).abs().max().item()
    assert err <= 5e-2, err
    shares = []
    for name, layer in lora_layers(model, "default").items():
        base = layer.get_base_layer()
        assert base.weight.dtype == torch.bfloat16
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        residual = weight_matrix(base).float()
        recon = residual + s * (b.float() @ a.float())
        # Against the ORIGINAL weight (the residual alone would only compare s·B·A with itself): the residual
        # W − s·B·A, formed in float32 from the stored A and B, is cast once, so base + s·B·A misses W by at
        # most half a bf16 ulp of each residual entry (8 significant bits: 2⁻⁸ relative), plus float32 noise.
        bound = residual.abs() * 2.0**-8 * 1.01 + 1e-6 * (originals[name].abs() + (s * (b.float() @ a.float())).abs())
        assert ((recon - originals[name]).abs() <= bound).all(), name
        shares.append((s * (b.float() @ a.float())).abs().max().item())
    # and it really is a rewrite: the adapters hold a non-zero share of W (not gate_proj's: d_out 64 > d_in 32, so
    # its smallest eigenvectors span W's left null space and A = QᵀW ≈ 0 there)
    assert max(shares) > 1e-3, shares


def _reference_outputs(model, targets, batches):
    """Each target layer's non-padding output rows, collected independently of the library."""
    rows = {}

    def hook(name):
        def fn(module, args, out):
            mask = current["mask"].bool()
            rows.setdefault(name, []).append(out.detach()[mask].double())

        return fn

    current = {}
    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and any(n.endswith(t) for t in targets)
    ]
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            model(**batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def _reference_statistic(y, statistic):
    if statistic == "covariance":
        mu = y.mean(0)
        return y.T @ y / len(y) - torch.outer(mu, mu)
    return y.T @ y / len(y)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("statistic", ["covariance", "second_moment"])
@pytest.mark.parametrize("selection", ["smallest", "largest", "middle", "lower_quartile", "upper_quartile", "random"])
def test_b_spans_selected_eigenvectors_and_a_is_bt_w(family, statistic, selection, batches):
    factory, targets, _ = MODELS[family]
    outputs = _reference_outputs(factory(), targets, batches)
    model = peft_model(family)
    originals = {n: weight_matrix(l.get_base_layer()).detach().clone().double() for n, l in lora_layers(model, "default").items()}
    config = AstraConfig(eigen_selection=selection, statistic=statistic, accumulation_dtype="float64", seed=3, **QUIET)
    report = initialize_astra_weights(model, batches, config)
    by_name = {l.name: l for l in report.layers}
    for name, layer in lora_layers(model, "default").items():
        b = layer.lora_B["default"].weight.double()
        a = layer.lora_A["default"].weight.double()
        r = b.shape[1]
        assert torch.allclose(b.T @ b, torch.eye(r, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(a, b.T @ originals[name], atol=1e-4)
        values, vectors = torch.linalg.eigh(_reference_statistic(outputs[name], statistic))
        sel = by_name[name].selection
        k = int((values <= sel.threshold).sum())
        assert k == sel.n_degenerate
        expected = selection_indices(len(values), r, selection, seed=3, name=name)
        assert sel.indices == expected.tolist()
        regular = [i for i in sel.indices if i >= k]
        # non-degenerate selected directions: exactly the reference eigenvectors
        q = vectors[:, regular]
        if regular:
            assert (q.T @ b @ b.T @ q - torch.eye(len(regular), dtype=torch.float64)).abs().max() < 1e-4
        # degenerate ones: inside the reference's degenerate eigenspace
        if len(regular) < len(sel.indices):
            null = vectors[:, :k]
            inside = null @ (null.T @ b)
            assert (b - inside).norm(dim=0).sort().values[: len(sel.indices) - len(regular)].max() < 1e-4


def test_selection_indices_documented():
    assert selection_indices(100, 4, "smallest").tolist() == [0, 1, 2, 3]
    assert selection_indices(100, 4, "largest").tolist() == [96, 97, 98, 99]
    assert selection_indices(100, 4, "middle").tolist() == [48, 49, 50, 51]
    assert selection_indices(100, 4, "lower_quartile").tolist() == [23, 24, 25, 26]
    assert selection_indices(100, 4, "upper_quartile").tolist() == [73, 74, 75, 76]
    random = selection_indices(100, 4, "random", seed=1, name="x")
    assert len(set(random.tolist())) == 4 and (np.diff(random) > 0).all()
    assert (random == selection_indices(100, 4, "random", seed=1, name="x")).all()
    assert (random != selection_indices(100, 4, "random", seed=2, name="x")).any()


def test_alpha_and_rslora_scaling_respected(batches):
    model = peft_model("llama", r=4, alpha=32, use_rslora=True)
    before = logits(model, batches[0])
    initialize_astra_weights(model, batches, AstraConfig(**QUIET))
    assert (logits(model, batches[0]) - before).abs().max() <= 1e-4


def test_named_adapter_of_several(batches):
    from peft import LoraConfig

    model = peft_model("llama")
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.set_adapter("other")
    before = logits(model, batches[0])
    untouched = {n: l.lora_B["default"].weight.clone() for n, l in lora_layers(model, "default").items()}
    report = initialize_astra_weights(model, batches, AstraConfig(**QUIET), adapter_name="other")
    assert len(report.layers) == 2  # the two q_proj layers of "other"
    assert (logits(model, batches[0]) - before).abs().max() <= 1e-4
    for n, l in lora_layers(model, "default").items():
        assert torch.equal(l.lora_B["default"].weight, untouched[n])


def test_forward_fn_for_models_needing_another_call(batches):
    model = peft_model("llama")
    calls = []

    def forward_fn(m, batch):
        calls.append(1)
        return m(input_ids=batch["ids"], attention_mask=batch["attention_mask"])

    renamed = [{"ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    before = logits(model, batches[0])
    initialize_astra_weights(model, renamed, AstraConfig(**QUIET), forward_fn=forward_fn)
    assert len(calls) >= len(batches)
    assert (logits(model, batches[0]) - before).abs().max() <= 1e-4


def test_token_budget_stops_early():
    from astra_peft import collect_activation_stats

    batches = make_batches(n_batches=8, pad_rows=False)
    stats = collect_activation_stats(tiny_llama(), batches, lora_config("llama"), AstraConfig(max_tokens=100, **QUIET))
    assert stats.tokens("model.layers.0.self_attn.q_proj") == 160  # two batches of 4 × 20
