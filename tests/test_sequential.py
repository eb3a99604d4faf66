"""Sequential calibration (issue 12, part 2): the reduced-rank regression and the layer-by-layer builds."""
import pytest
import torch

from emloc.lowrank import (least_squares_target, sequential_error, sequential_truncation,
                           whitened_truncation)

F64 = torch.float64


def problem(seed, out_features=6, in_features=5, tokens=20, drift=0.3):
    """``W``, the original's inputs ``X`` and the emulator's ``X~ = X + drift * noise`` (columns are tokens)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g, dtype=F64)
    X = torch.randn(in_features, tokens, generator=g, dtype=F64)
    X_tilde = X + drift * torch.randn(in_features, tokens, generator=g, dtype=F64)
    return W, X, X_tilde


def objective(W, W_emulated, X, X_tilde):
    return float((W @ X - W_emulated @ X_tilde).norm() ** 2)


def brute_force(W, X, X_tilde, r, restarts=8, seed=0):
    """The smallest ``||W X - G H X~||^2`` over rank-``r`` products found by LBFGS from random starts."""
    g = torch.Generator().manual_seed(seed)
    best = float("inf")
    for _ in range(restarts):
        G = torch.randn(W.shape[0], r, generator=g, dtype=F64).requires_grad_()
        H = torch.randn(r, W.shape[1], generator=g, dtype=F64).requires_grad_()
        optimizer = torch.optim.LBFGS([G, H], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (W @ X - G @ H @ X_tilde).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            optimizer.step(closure)
        with torch.no_grad():
            best = min(best, objective(W, G @ H, X, X_tilde))
    return best


@pytest.mark.parametrize("seed,r,tokens", [(0, 1, 20), (1, 2, 20), (2, 3, 20), (3, 2, 4), (4, 1, 3)])
def test_closed_form_is_never_beaten_and_matches_brute_force(seed, r, tokens):
    W, X, X_tilde = problem(seed, tokens=tokens)
    u, v, _ = sequential_truncation(W, X_tilde @ X_tilde.T, X @ X_tilde.T, r)
    closed = objective(W, u @ v, X, X_tilde)
    searched = brute_force(W, X, X_tilde, r)
    assert closed <= searched * (1 + 1e-8) + 1e-10
    assert searched == pytest.approx(closed, rel=1e-6, abs=1e-9)
    assert u.shape == (W.shape[0], r) and v.shape == (r, W.shape[1])


def test_error_splits_into_regression_and_truncation_parts():
    W, X, X_tilde = problem(5, out_features=7, in_features=6, tokens=30)
    C_tilde, P = X_tilde @ X_tilde.T, X @ X_tilde.T
    W_ls = least_squares_target(W, C_tilde, P)
    torch.testing.assert_close(W_ls @ C_tilde, W @ P)                    # the normal equations
    u, v, _ = sequential_truncation(W, C_tilde, P, 2)
    total = objective(W, u @ v, X, X_tilde)
    parts = objective(W, W_ls, X, X_tilde) + float(((W_ls - u @ v) @ X_tilde).norm() ** 2)
    assert total == pytest.approx(parts, rel=1e-10)
    relative = sequential_error(W, u @ v, X @ X.T, P, C_tilde)
    assert relative == pytest.approx((total / float((W @ X).norm() ** 2)) ** 0.5, rel=1e-8)


def test_same_inputs_reproduce_the_activation_aware_truncation_exactly():
    W, X, _ = problem(6, out_features=8, in_features=5, tokens=3)     # C singular: 3 tokens, 5 features
    C = X @ X.T
    assert torch.equal(least_squares_target(W, C, C), W)
    for r in (1, 2, 4):
        for ours, reference in zip(sequential_truncation(W, C, C, r), whitened_truncation(W, C, r)):
            assert torch.equal(ours, reference)


def test_rank_deficient_emulator_inputs_keep_W_outside_their_span():
    W, X, X_tilde = problem(7, out_features=6, in_features=8, tokens=4)  # C~ has rank 4 of 8
    C_tilde, P = X_tilde @ X_tilde.T, X @ X_tilde.T
    W_ls = least_squares_target(W, C_tilde, P)
    null = torch.linalg.svd(X_tilde.T)[2][4:].T                       # (in, 4): directions X~ never takes
    torch.testing.assert_close((W_ls - W) @ null, torch.zeros(6, 4, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(W_ls @ C_tilde, W @ P)
    u, v, _ = sequential_truncation(W, C_tilde, P, 2)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    assert objective(W, u @ v, X, X_tilde) <= brute_force(W, X, X_tilde, 2) * (1 + 1e-8) + 1e-10
