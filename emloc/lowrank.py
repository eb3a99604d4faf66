"""Stage-1 math: ranks, whitening and truncated decompositions (pure tensor functions).

Notation (docs/architecture.md): ``W`` is ``(out, in)``; ``C = sum_t x_t x_t^T`` is ``(in, in)``;
``C = S S^T``; the emulator layer is ``W' = u v`` with ``u: (out, r)`` and ``v: (r, in)``.
"""
from __future__ import annotations

import math

import torch


def break_even_rank(out_features: int, in_features: int) -> float:
    """Rank at which ``u v`` holds as many parameters as ``W``: ``out * in / (out + in)``."""
    return out_features * in_features / (out_features + in_features)


def rank_from_ratio(rho: float, out_features: int, in_features: int) -> int:
    """The official rule ``r = floor(rho * out * in / (out + in))``, at least 1."""
    return max(1, math.floor(rho * break_even_rank(out_features, in_features)))


def whitening_factor(C: torch.Tensor) -> torch.Tensor:
    """``S`` (``in x in``) with ``S S^T = C``, from ``eigh(C)``; works when ``C`` is singular.

    ``S = E diag(sqrt(max(lambda, 0)))``: no inverse, so fewer calibration tokens than ``in`` is fine.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(C)
    return eigenvectors * eigenvalues.clamp_min(0).sqrt()


def whitened_basis(W: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors ``U`` (``out x k``) and singular values ``sigma`` of ``W S``, descending."""
    U, sigma, _ = torch.linalg.svd(W @ S, full_matrices=False)
    return U, sigma


def whitened_basis_from_gram(W: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`whitened_basis` via ``eigh(M)``, ``M = W C W^T`` (``out x out``): cheaper when
    out < in."""
    M = W @ C @ W.T
    eigenvalues, eigenvectors = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvectors[:, order], eigenvalues[order].clamp_min(0).sqrt()


def whitened_basis_from_right_gram(W: torch.Tensor, S: torch.Tensor,
                                   r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``r`` left singular vectors ``U_r`` (``out x r``) and all singular values of ``W S`` via
    ``eigh(G)``, ``G = (W S)^T (W S)`` (``in x in``): ``U_r = W S V_r / sigma_r``. Cheaper than the SVD
    when ``out > in``; falls back to the SVD when ``sigma_r`` is too small for the division to be accurate.
    """
    WS = W @ S
    G = WS.T @ WS
    eigenvalues, V = torch.linalg.eigh((G + G.T) / 2)
    order = torch.argsort(eigenvalues, descending=True)
    sigma = eigenvalues[order].clamp_min(0).sqrt()
    if r > len(sigma) or sigma[r - 1] <= 100 * torch.finfo(W.dtype).eps ** 0.5 * sigma[0]:
        U, sigma = whitened_basis(W, S)
        return U[:, :r], sigma
    return WS @ V[:, order[:r]] / sigma[:r], sigma


def project_onto_basis(W: torch.Tensor, U: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate to the top-``r`` columns of ``U``: ``u = U_r`` (``out x r``), ``v = U_r^T W`` (``r x in``).

    ``u v = U_r U_r^T W`` minimises ``||(W - W') X||_F`` when ``U`` comes from ``W S``.
    """
    u = U[:, :r]
    return u, u.T @ W


def whitened_truncation(W: torch.Tensor, C: torch.Tensor,
                        r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation-aware rank-``r`` factors ``(u, v)`` of ``W`` and the whitened spectrum ``sigma``."""
    out_features, in_features = W.shape
    if out_features < in_features:
        U, sigma = whitened_basis_from_gram(W, C)
    else:
        U, sigma = whitened_basis(W, whitening_factor(C))
    u, v = project_onto_basis(W, U, r)
    return u, v, sigma


def plain_truncation(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain truncated SVD ``W ~ U_r (U_r^T W)``, ignoring activations; returns ``(u, v, sigma)``."""
    U, sigma, _ = torch.linalg.svd(W, full_matrices=False)
    u, v = project_onto_basis(W, U, r)
    return u, v, sigma


def official_whitened_truncation(W: torch.Tensor, C: torch.Tensor, r: int, eps: float = 1e-6) -> torch.Tensor:
    """The paper's algorithm for one linear: ``eigh(C)``, SVD of ``W S``, truncate, multiply by ``S^-1``.

    Returns ``W'`` (``out x in``). Kept as the reference for tests and benchmarks; ``C`` must be
    (numerically) positive definite, so small eigenvalues are floored at ``eps * max``.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(C)
    eigenvalues = eigenvalues.clamp_min(eps * eigenvalues.max())
    S = eigenvectors * eigenvalues.sqrt()
    S_inv = (eigenvectors / eigenvalues.sqrt()).T
    U, sigma, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    return (U[:, :r] * sigma[:r]) @ Vh[:r] @ S_inv


def relative_error_curve(sigma: torch.Tensor) -> torch.Tensor:
    """``err[k] = sqrt(sum_{i>=k} sigma_i^2 / sum_i sigma_i^2)`` for k = 0..len(sigma): error of keeping k."""
    energy = sigma.double().pow(2)
    total = energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return (tail / total).sqrt()


def kept_energy(sigma: torch.Tensor, r: int) -> float:
    """Share of ``sum sigma^2`` kept by the top ``r`` singular values."""
    return 1.0 - float(relative_error_curve(sigma)[min(r, len(sigma))]) ** 2


def calibration_error(W: torch.Tensor, W_emulated: torch.Tensor, C: torch.Tensor) -> float:
    """Relative error on the calibration inputs: ``||(W - W') X||_F / ||W X||_F``, via ``C = X X^T``."""
    delta = W - W_emulated
    numerator = torch.einsum("oi,ij,oj->", delta, C, delta).clamp_min(0)
    denominator = torch.einsum("oi,ij,oj->", W, C, W).clamp_min(torch.finfo(C.dtype).tiny)
    return float((numerator / denominator).sqrt())


def damped_gram(C_tilde: torch.Tensor, damping: float) -> torch.Tensor:
    """``C~ + delta I`` (``in x in``, symmetrised), ``C~ = X~ X~^T``, ``delta = damping * mean(diag C~)``:
    the Gram matrix ``X_aug X_aug^T`` of the ridge's augmented inputs ``X_aug = [X~, sqrt(delta) I]``
    (``in x (T + in)``), under which :func:`sequential_truncation` truncates.

    ``damping = 0`` returns ``C_tilde`` itself (the same tensor, untouched).
    """
    if damping <= 0:
        return C_tilde
    C_sym = (C_tilde + C_tilde.T) / 2
    delta = damping * C_sym.diagonal().mean()
    eye = torch.eye(C_sym.shape[0], dtype=C_sym.dtype, device=C_sym.device)
    return C_sym + delta * eye


def least_squares_target(W: torch.Tensor, C_tilde: torch.Tensor, P: torch.Tensor, damping: float = 0.0,
                         rtol: float | None = None) -> torch.Tensor:
    """``W_ls`` (``out x in``, any rank) minimising ``||W X - W_ls X~||_F^2 + delta ||W_ls - W||_F^2``, with
    ``C~ = X~ X~^T``, ``P = X X~^T`` (both ``in x in``) and ``delta = damping * mean(diag C~)``.

    The normal equations ``W_ls (C~ + delta I) = W P + delta W`` give
    ``W_ls = W + W (P - C~) (C~ + delta I)^-1``.
    ``damping = 0`` is the plain least-squares map closest to ``W``: ``W + W (P - C~) C~^+`` (its deviation
    from ``W`` lies in the range of ``C~``; ``rtol``, default float32 epsilon, cuts the pseudo-inverse).
    ``X~ = X`` gives ``P = C~`` and ``W_ls = W`` exactly, for any damping.
    """
    if damping > 0:
        # X (C~ + delta I) = W (P - C~), solved from the right through the symmetric system
        return W + torch.linalg.solve(damped_gram(C_tilde, damping), (W @ (P - C_tilde)).T).T
    if rtol is None:
        rtol = torch.finfo(torch.float32).eps
    C_sym = (C_tilde + C_tilde.T) / 2
    return W + W @ (P - C_tilde) @ torch.linalg.pinv(C_sym, rtol=rtol, hermitian=True)


def sequential_truncation(W: torch.Tensor, C_tilde: torch.Tensor, P: torch.Tensor, r: int,
                          damping: float = 0.0,
                          rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``r`` factors ``(u, v)`` (``out x r``, ``r x in``) minimising, over ``W' = u v``,

        ``||W X - W' X~||_F^2 + delta ||W' - W||_F^2``,   ``delta = damping * mean(diag C~)``,

    and the whitened spectrum ``sigma`` of ``W_ls`` (:func:`least_squares_target`) under ``C~ + delta I``.

    The objective is ``||Y_aug - W' X_aug||_F^2`` with ``X_aug = [X~, sqrt(delta) I]`` and
    ``Y_aug = [W X, sqrt(delta) W]``: ``X_aug X_aug^T = C~ + delta I`` (:func:`damped_gram`) and ``W_ls``
    solves its normal equations, so ``||Y_aug - W' X_aug||^2 = ||Y_aug - W_ls X_aug||^2 +
    ||(W_ls - W') X_aug||^2`` and ``W'`` is the activation-aware truncation of ``W_ls`` under
    ``C~ + delta I``: ``u = U_r``, ``v = U_r^T W_ls``, ``U_r`` the top eigenvectors of
    ``W_ls (C~ + delta I) W_ls^T``. ``damping = 0`` is the plain reduced-rank regression
    ``min ||W X - W' X~||_F`` (truncation under ``C~`` itself).
    """
    W_ls = least_squares_target(W, C_tilde, P, damping, rtol)
    return whitened_truncation(W_ls, damped_gram(C_tilde, damping), r)


def sequential_error(W: torch.Tensor, W_emulated: torch.Tensor, C: torch.Tensor, P: torch.Tensor,
                     C_tilde: torch.Tensor) -> float:
    """Relative error ``||W X - W' X~||_F / ||W X||_F`` from ``C = X X^T``, ``P = X X~^T``,
    ``C~ = X~ X~^T``."""
    squared = (torch.einsum("oi,ij,oj->", W, C, W) - 2 * torch.einsum("oi,ij,oj->", W, P, W_emulated)
               + torch.einsum("oi,ij,oj->", W_emulated, C_tilde, W_emulated)).clamp_min(0)
    denominator = torch.einsum("oi,ij,oj->", W, C, W).clamp_min(torch.finfo(C.dtype).tiny)
    return float((squared / denominator).sqrt())
