"""The right-Gram path of the activation-aware construction (used when out > in) equals the SVD path."""
import torch

from emloc.lowrank import project_onto_basis, whitened_basis, whitened_basis_from_right_gram, whitening_factor


def test_right_gram_basis_gives_the_svd_emulator_and_falls_back_when_rank_deficient():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 16, generator=g, dtype=torch.float64)
    X = torch.randn(16, 40, generator=g, dtype=torch.float64)
    S = whitening_factor(X @ X.T)
    U, sigma = whitened_basis(W, S)
    U_r, sigma_gram = whitened_basis_from_right_gram(W, S, 6)
    assert U_r.shape == (48, 6) and torch.allclose(sigma_gram, sigma, atol=1e-9)
    emulated = [u @ v for u, v in (project_onto_basis(W, U_r, 6), project_onto_basis(W, U, 6))]
    assert torch.allclose(*emulated, atol=1e-9)
    # C of rank 5: sigma_6 is 0, so the Gram division would be meaningless; the SVD fallback is used
    X_low = torch.randn(16, 5, generator=g, dtype=torch.float64)
    S_low = whitening_factor(X_low @ X_low.T)
    U_low, _ = whitened_basis_from_right_gram(W, S_low, 6)
    assert torch.allclose(U_low, whitened_basis(W, S_low)[0][:, :6])
