"""Spectrum: the subset solver, the null-space policies, and the effective rank."""

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import make_batches, peft_model

from astra_peft import AstraConfig, effective_rank, effective_ranks, initialize_astra_weights
from astra_peft import spectrum
from astra_peft.layers import lora_layers

QUIET = dict(show_progress=False)
GATE = "model.layers.0.mlp.gate_proj"  # d_out 64 > d_in 32: 32 structurally zero eigenvalues


def _psd(d, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return x @ x.T


def test_subset_solver_matches_full_decomposition():
    m = _psd(40, 40)
    values, vectors = torch.linalg.eigh(m)
    assert torch.allclose(spectrum.eigenvalues(m), values, atol=1e-9)
    sub = spectrum.eigenvectors(m, 3, 9)
    assert torch.allclose((sub.T @ vectors[:, 3:10]).abs(), torch.eye(7, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("lo,hi", [(0, 7), (150, 165), (292, 299), (0, 299)])
def test_one_reduction_serves_all_eigenvalues_and_any_range(lo, hi):
    """The dense CPU path reduces once (dsytrd) and takes eigenvalues and an eigenvector range from T."""
    m = _psd(300, 400, seed=1)
    values, vectors = torch.linalg.eigh(m)
    tri = spectrum._Tridiagonal(m)
    assert torch.allclose(tri.values, values, rtol=0, atol=1e-9 * float(values[-1]))
    sub = tri.vectors(lo, hi)
    assert sub.shape == (300, hi - lo + 1)
    assert torch.allclose(sub.T @ sub, torch.eye(hi - lo + 1, dtype=torch.float64), atol=1e-10)
    overlap = torch.linalg.svdvals(sub.T @ vectors[:, lo : hi + 1])  # cosines of the principal angles
    assert overlap.min() > 1 - 1e-8


def test_effective_rank():
    assert effective_rank(torch.ones(10)) == pytest.approx(10)
    assert effective_rank(torch.tensor([5.0, 0, 0])) == pytest.approx(1)
    assert effective_rank(torch.zeros(4)) == 0.0


def _report(null_space, selection="smallest"):
    model = peft_model("llama")
    report = initialize_astra_weights(model, make_batches(), AstraConfig(null_space=null_space, eigen_selection=selection, **QUIET))
    return model, {l.name: l for l in report.layers}


def test_rank_deficiency_is_counted_per_layer():
    _, layers = _report("keep")
    assert layers[GATE].selection.n_degenerate == 32
    assert layers[GATE].selection.n_selected_degenerate == 4
    assert layers["model.layers.0.mlp.down_proj"].selection.n_degenerate == 0


def test_keep_policy_puts_b_in_the_left_null_space():
    model, _ = _report("keep")
    layer = lora_layers(model, "default")[GATE]
    a = layer.lora_A["default"].weight
    assert a.abs().max() < 1e-5  # A = QᵀW = 0: the paper's literal recipe starts from an empty update


def test_exclude_policy_selects_occupied_directions():
    model, layers = _report("exclude")
    sel = layers[GATE].selection
    assert sel.n_selected_degenerate == 0
    assert min(sel.eigenvalues) > sel.threshold
    assert sel.indices == list(range(32, 36))
    a = lora_layers(model, "default")[GATE].lora_A["default"].weight
    assert a.norm(dim=1).min() > 1e-3


def test_null_space_basis_is_independent_of_the_solver(monkeypatch):
    """Rotate the solver's basis of the degenerate space: the chosen B must not move."""
    m = _psd(12, 7)  # 5 zero eigenvalues (float64: degeneracy is judged in the float64 decomposition)
    config = AstraConfig(eigen_selection="smallest")
    q1, info = spectrum.select_eigenvectors(m, 3, config, "x")
    assert info.n_degenerate == 5 and info.n_selected_degenerate == 3
    rot = torch.from_numpy(scipy.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))[0])

    real = spectrum.full_eigenvectors

    def rotated(matrix):
        v = real(matrix).clone()
        v[:, :5] = v[:, :5] @ rot
        return v

    monkeypatch.setattr(spectrum, "full_eigenvectors", rotated)
    q2, _ = spectrum.select_eigenvectors(m, 3, config, "x")
    assert torch.allclose(q1, q2, atol=1e-10)
    # and it is Gram–Schmidt of the null-space projector's first columns
    null = torch.from_numpy(scipy.linalg.null_space(m.numpy(), rcond=1e-10))
    assert null.shape[1] == 5
    p = null @ null.T
    expected, _ = torch.linalg.qr(p[:, :3])
    assert torch.allclose((expected.T @ q1).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)


def test_exclude_needs_enough_directions():
    m = _psd(12, 2)
    with pytest.raises(ValueError, match="non-degenerate"):
        spectrum.select_eigenvectors(m, 3, AstraConfig(null_space="exclude"), "x")


def test_effective_ranks_on_a_peft_model_include_the_adapter():
    model = peft_model("llama")
    before = effective_ranks(model, make_batches(), max_tokens=10_000)
    assert set(before) == set(lora_layers(model, "default"))
    assert all(0 < v <= 64 for v in before.values())
    for layer in lora_layers(model, "default").values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=1.0)
    after = effective_ranks(model, make_batches())
    assert any(abs(after[n] - before[n]) > 1e-3 for n in before)


@pytest.mark.parametrize("selection", ["smallest", "largest", "middle", "random"])
@pytest.mark.parametrize("null_space", ["keep", "exclude"])
@pytest.mark.parametrize("inner_rank", [9, 12])
def test_factored_statistic_selects_like_the_dense_matrix(selection, null_space, inner_rank):
    """F·G·Fᵀ with F tall (d_out > d_in, as gate/up): same spectrum, same B, without the d_out² matrix. With
    inner_rank 12 only the structural zeros are degenerate (gate/up's usual case); with 9, the small problem too."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(30, 12, generator=g, dtype=torch.float64)
    x = torch.randn(12, inner_rank, generator=g, dtype=torch.float64)
    cov = x @ x.T
    config = AstraConfig(eigen_selection=selection, null_space=null_space, seed=2)
    dense_q, dense = spectrum.select_eigenvectors(f @ cov @ f.T, 4, config, "x")
    fact_q, fact = spectrum.select_eigenvectors((f, cov), 4, config, "x")
    assert fact.n_degenerate == dense.n_degenerate == 30 - inner_rank
    assert fact.indices == dense.indices
    assert torch.allclose(torch.tensor(fact.eigenvalues), torch.tensor(dense.eigenvalues), atol=1e-9)
    assert torch.allclose(fact_q @ fact_q.T, dense_q @ dense_q.T, atol=1e-8)
    if null_space == "keep" and selection == "smallest":  # the deterministic null basis itself agrees
        assert torch.allclose(fact_q, dense_q, atol=1e-8)


@pytest.mark.parametrize("rank", [7, 3])  # 5 degenerate of 12 (their basis is computed), 9 (the complement's is)
def test_null_space_basis_is_independent_of_the_tridiagonal_solver(monkeypatch, rank):
    """The CPU projector takes min(k, d − k) eigenvectors from the one dsytrd reduction: rotate them, B stays."""
    m = _psd(12, rank)
    config = AstraConfig(eigen_selection="smallest")
    q1, info = spectrum.select_eigenvectors(m, 3, config, "x")
    assert info.n_degenerate == 12 - rank and info.n_selected_degenerate == 3
    real = spectrum._Tridiagonal.vectors

    def rotated(self, lo, hi):
        v = real(self, lo, hi).clone()
        n = v.shape[1]
        rot = torch.from_numpy(scipy.linalg.qr(np.random.default_rng(n).normal(size=(n, n)))[0])
        return v @ rot

    monkeypatch.setattr(spectrum._Tridiagonal, "vectors", rotated)
    q2, _ = spectrum.select_eigenvectors(m, 3, config, "x")
    assert torch.allclose(q1, q2, atol=1e-10)
    null = torch.from_numpy(scipy.linalg.null_space(m.numpy(), rcond=1e-10))
    expected, _ = torch.linalg.qr((null @ null.T)[:, :3])  # Gram–Schmidt of the projector's first columns
    assert torch.allclose((expected.T @ q1).abs(), torch.eye(3, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("inner_rank", [12, 9, 4])  # small-spectrum cluster m = 0, 3 (its basis), 8 (complement's)
def test_factored_null_space_basis_equals_the_dense_one(inner_rank):
    """The factored projector works in the Householder coordinates and maps back only the m chosen vectors: the
    same B as the dense matrix's, column for column."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(40, 12, generator=g, dtype=torch.float64)
    x = torch.randn(12, inner_rank, generator=g, dtype=torch.float64)
    cov = x @ x.T
    config = AstraConfig(eigen_selection="smallest")
    dense_q, dense = spectrum.select_eigenvectors(f @ cov @ f.T, 20, config, "x")
    fact_q, fact = spectrum.select_eigenvectors((f, cov), 20, config, "x")
    assert fact.n_selected_degenerate == dense.n_selected_degenerate == 20
    assert torch.allclose(fact_q, dense_q, atol=1e-10)
