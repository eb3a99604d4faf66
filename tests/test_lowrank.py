"""Stage-1 math invariants on random matrices (float64)."""
import math

import pytest
import torch

from emloc.lowrank import (break_even_rank, calibration_error, official_whitened_truncation, plain_truncation,
                           rank_from_ratio, relative_error_curve, whitened_basis, whitened_basis_from_gram,
                           whitened_truncation, whitening_factor)


def make_problem(out_features, in_features, n_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g, dtype=torch.float64)
    # correlated, anisotropic activations, like a real layer's inputs
    mixing = torch.randn(in_features, in_features, generator=g, dtype=torch.float64) * torch.logspace(0, -2, in_features, dtype=torch.float64)
    X = mixing @ torch.randn(in_features, n_tokens, generator=g, dtype=torch.float64)
    return W, X, X @ X.T


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_full_rank_reproduces_W(shape):
    W, _, C = make_problem(*shape, n_tokens=200)
    u, v, _ = whitened_truncation(W, C, min(shape))
    assert torch.allclose(u @ v, W, atol=1e-9)
    u, v, _ = plain_truncation(W, min(shape))
    assert torch.allclose(u @ v, W, atol=1e-9)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)])
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_activation_aware_beats_plain_on_calibration_inputs(shape, rank):
    W, X, C = make_problem(*shape, n_tokens=200, seed=rank)
    u, v, _ = whitened_truncation(W, C, rank)
    pu, pv, _ = plain_truncation(W, rank)
    aware = torch.linalg.norm((W - u @ v) @ X)
    plain = torch.linalg.norm((W - pu @ pv) @ X)
    assert aware <= plain * (1 + 1e-10)
    assert math.isclose(calibration_error(W, u @ v, C), float(aware / torch.linalg.norm(W @ X)), rel_tol=1e-8)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_inverse_free_form_equals_official_algorithm(shape):
    W, _, C = make_problem(*shape, n_tokens=300)
    u, v, _ = whitened_truncation(W, C, 6)
    assert torch.allclose(u @ v, official_whitened_truncation(W, C, 6, eps=0.0), atol=1e-8)


def test_gram_and_whitening_forms_give_the_same_spectrum_and_projector():
    W, _, C = make_problem(12, 30, n_tokens=100)
    U1, s1 = whitened_basis(W, whitening_factor(C))
    U2, s2 = whitened_basis_from_gram(W, C)
    assert torch.allclose(s1, s2[: len(s1)], rtol=1e-7, atol=1e-9)
    assert torch.allclose(U1[:, :5] @ U1[:, :5].T, U2[:, :5] @ U2[:, :5].T, atol=1e-8)


def test_fewer_tokens_than_width_still_works():
    W, X, C = make_problem(16, 32, n_tokens=10)  # C has rank 10 < 32
    assert torch.linalg.matrix_rank(C) <= 10
    u, v, sigma = whitened_truncation(W, C, 4)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    pu, pv, _ = plain_truncation(W, 4)
    assert torch.linalg.norm((W - u @ v) @ X) <= torch.linalg.norm((W - pu @ pv) @ X) * (1 + 1e-10)
    # keeping the rank of C reproduces W exactly on the calibration inputs
    u, v, _ = whitened_truncation(W, C, 10)
    assert torch.linalg.norm((W - u @ v) @ X) < 1e-8 * torch.linalg.norm(W @ X)


def test_error_curve_matches_the_error_of_each_truncation():
    W, _, C = make_problem(20, 14, n_tokens=100)
    _, _, sigma = whitened_truncation(W, C, 1)
    curve = relative_error_curve(sigma)
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0)
    assert torch.all(curve[1:] <= curve[:-1] + 1e-12)
    for r in (2, 5, 9):
        u, v, _ = whitened_truncation(W, C, r)
        assert float(curve[r]) == pytest.approx(calibration_error(W, u @ v, C), rel=1e-7)


def test_rank_rule_and_break_even():
    assert break_even_rank(576, 576) == 288
    assert rank_from_ratio(0.5, 576, 576) == 144
    assert rank_from_ratio(0.5, 1536, 576) == math.floor(0.5 * 1536 * 576 / 2112)
    assert rank_from_ratio(0.001, 8, 8) == 1
    for rho in (0.25, 0.5, 0.75, 0.99):
        r = rank_from_ratio(rho, 100, 300)
        assert r * (100 + 300) < 100 * 300
