"""Our clamped correction equals the official EMLoC procedure (issue 12, part 0).

The reference below is our own transcription of the official procedure, from reading its description:
SVD of ``A^T`` gives the basis ``Q`` (columns by descending singular value), ``B~ = B A Q``, the mismatch
``D = (W - W') Q`` (measured by running both layers on the rows of ``Q^T``, so biases cancel), a
per-column ratio ``mean|D_j| / mean|B~_j|`` and, where it exceeds ``lambda``, ``D_j`` scaled by
``lambda / ratio_j`` before ``B^ = B~ - D``. The official code assumes ``s = 1``.
"""
import pytest
import torch

from emloc.correction import correct_lora_pair

F64 = torch.float64


def official_correction(A, B, W, W_emulated, lam):
    """Reference (``s = 1``): returns ``(A', B^)`` with ``A' = Q^T`` (``r x in``), ``B^`` (``out x r``)."""
    Q, sigma, Vh = torch.linalg.svd(A.T, full_matrices=False)      # A^T = Q diag(sigma) Vh
    B_tilde_rows = sigma[:, None] * (Vh @ B.T)                       # (r, out): rows are columns of B A Q
    bias = torch.linspace(-1, 1, W.shape[0], dtype=A.dtype)
    full = Q.T @ W.T + bias                                          # the original layer on the rows of Q^T
    emulated = Q.T @ W_emulated.T + bias                             # the emulator layer on the same rows
    D_rows = full - emulated
    ratio = D_rows.abs().mean(dim=1, keepdim=True) / B_tilde_rows.abs().mean(dim=1, keepdim=True)
    scale = torch.where(ratio > lam, lam / ratio, torch.ones_like(ratio))
    return Q.T, (B_tilde_rows - D_rows * scale).T


def random_problem(seed, out_features=24, in_features=40, r=8, mismatch=1.0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)
    W = rand(out_features, in_features)
    W_emulated = W - mismatch * rand(out_features, 5) @ rand(5, in_features) / 5  # a rank-5 compression error
    # A with singular values 1..0.01: the columns of B~ = B A Q shrink with them, so the ratios
    # mean|D_j| / mean|B~_j| straddle every lambda tested
    U, _, Vh = torch.linalg.svd(rand(r, in_features), full_matrices=False)
    A = U @ torch.diag(torch.logspace(0, -2, r, dtype=F64)) @ Vh
    return W, W_emulated, A, rand(out_features, r)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lam", [1.0, 3.0, 10.0])
def test_clamped_correction_equals_the_official_procedure_at_s_1(seed, lam):
    W, W_emulated, A, B = random_problem(seed)
    A_ref, B_ref = official_correction(A, B, W, W_emulated, lam)
    pair = correct_lora_pair(A, B, W, W_emulated, s=1.0, lam=lam)
    # The SVD fixes each basis vector up to sign; a sign flip flips A'_j and B^_j together.
    signs = torch.sign((pair.A * A_ref).sum(1))
    torch.testing.assert_close(pair.A * signs[:, None], A_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(pair.B * signs, B_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(pair.B @ pair.A, B_ref @ A_ref, rtol=0, atol=1e-12)
    assert 0 < int(pair.clamped.sum()) < A.shape[0]  # both branches of the clamp are exercised


@pytest.mark.parametrize("s", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("lam", [1.0, 3.0, 10.0])
def test_clamped_correction_equals_the_official_procedure_on_the_scaled_update(s, lam):
    """For ``s != 1`` the official procedure applies to the effective update ``(s B) A``: ours,
    rescaled by ``s``, is that update."""
    W, W_emulated, A, B = random_problem(7)
    A_ref, B_ref = official_correction(A, s * B, W, W_emulated, lam)
    pair = correct_lora_pair(A, B, W, W_emulated, s=s, lam=lam)
    torch.testing.assert_close(s * pair.B @ pair.A, B_ref @ A_ref, rtol=0, atol=1e-12)


def test_the_clamped_result_depends_on_the_basis():
    """Why the basis matters: with a QR basis the clamped update differs, so matching the official one is a
    real constraint (the unclamped update does not depend on the basis)."""
    W, W_emulated, A, B = random_problem(3)
    Q_qr, _ = torch.linalg.qr(A.T, mode="reduced")
    B_tilde = B @ A @ Q_qr
    D = (W - W_emulated) @ Q_qr
    ratio = D.abs().mean(0) / B_tilde.abs().mean(0)
    clamped_qr = (B_tilde - D * torch.where(ratio > 3.0, 3.0 / ratio, torch.ones_like(ratio))) @ Q_qr.T
    unclamped_qr = (B_tilde - D) @ Q_qr.T

    ours = correct_lora_pair(A, B, W, W_emulated, s=1.0, lam=3.0)
    ours_unclamped = correct_lora_pair(A, B, W, W_emulated, s=1.0, lam=None)
    torch.testing.assert_close(ours_unclamped.B @ ours_unclamped.A, unclamped_qr, rtol=0, atol=1e-12)
    assert (ours.B @ ours.A - clamped_qr).norm() > 1e-3 * clamped_qr.norm()


@pytest.mark.parametrize("s", [1.0, 2.0])
def test_unclamped_update_is_the_same_for_qr_and_svd_bases(s):
    W, W_emulated, A, B = random_problem(11)
    Q_qr, _ = torch.linalg.qr(A.T, mode="reduced")
    update_qr = s * (B @ A @ Q_qr - (W - W_emulated) @ Q_qr / s) @ Q_qr.T
    pair = correct_lora_pair(A, B, W, W_emulated, s=s, lam=None)
    torch.testing.assert_close(s * pair.B @ pair.A, update_qr, rtol=0, atol=1e-12)


def test_rank_deficient_A_keeps_the_rank_and_an_orthonormal_basis():
    W, W_emulated, A, B = random_problem(5)
    A[-1] = A[0] + A[1]                                           # rank r - 1
    pair = correct_lora_pair(A, B, W, W_emulated, s=1.0, lam=3.0)
    assert pair.A.shape == A.shape
    torch.testing.assert_close(pair.A @ pair.A.T, torch.eye(A.shape[0], dtype=F64), rtol=0, atol=1e-12)
    # the last basis vector lies outside A's row space: B~ is zero there and the clamp removes D entirely
    assert pair.B_tilde[:, -1].abs().max() < 1e-12 and bool(pair.clamped[-1])
    assert pair.B[:, -1].abs().max() < 1e-9
    A_ref, B_ref = official_correction(A, B, W, W_emulated, 3.0)
    torch.testing.assert_close(pair.B @ pair.A, B_ref @ A_ref, rtol=0, atol=1e-9)
