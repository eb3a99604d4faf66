"""Stage 3: LoRA correction (notation: docs/architecture.md) as pure functions, plus the driver over a peft
model.

peft's update is ``dW = s B A`` with ``A: (r, in)``, ``B: (out, r)``. With ``Q`` an orthonormal basis
(``in x r``) of the row space of ``A``: ``B A = B~ Q^T`` with ``B~ = B A Q``. The mismatch inside that
subspace is ``D = (W - W') Q / s``; the corrected pair is ``A' = Q^T``, ``B^ = B~ - clamp(target)``.

The *method* chooses the target (:data:`CORRECTION_TARGETS`, one entry per name of
:data:`emloc.config.CORRECTION_METHODS`): ``official`` subtracts ``D`` itself (the paper), ``aligned`` only
the part of ``D`` the adapter learned to compensate, ``activation_aware`` the mismatch measured on the
calibration activations. One function (:func:`correct_lora_pair`) and one report (:func:`pair_report`) serve
them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from emloc.config import CORRECTION_METHODS
from emloc.svd_emulator import EmulatorFactors
from emloc.families import weight_matrix
from emloc.targets import layer_index, module_type, typed
from emloc.errors import EmlocError


def orthonormal_row_basis(A: torch.Tensor) -> torch.Tensor:
    """``Q`` (``in x r``): the left singular vectors of ``A^T`` (``A: r x in``), by descending singular value.

    The official basis: the clamp acts per column of ``D`` and ``B~``, so the result depends on ``Q``, not
    only on its span. When ``A`` is rank-deficient the trailing columns (zero singular values) complete an
    orthonormal basis outside the row space; there ``B~_j = 0``, so any clamp removes that column's ``D_j``.
    """
    Q, _, _ = torch.linalg.svd(A.T, full_matrices=False)
    return Q


def subspace_mismatch(W: torch.Tensor, W_emulated: torch.Tensor, Q: torch.Tensor, s: float) -> torch.Tensor:
    """``D = (W - W') Q / s`` (``out x r``): what the original does differently on the adapter's inputs."""
    return (W - W_emulated) @ Q / s


def clamp_columns(D: torch.Tensor, B_tilde: torch.Tensor,
                  lam: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column ``j``: if ``mean|D_j| / mean|B~_j| > lam``, scale ``D_j`` by ``lam / ratio_j``.

    Returns the clamped ``D`` and a boolean mask of the clamped columns. ``lam=None``: no clamp.
    """
    if lam is None:
        return D, torch.zeros(D.shape[1], dtype=torch.bool, device=D.device)
    ratio = D.abs().mean(0) / B_tilde.abs().mean(0).clamp_min(torch.finfo(D.dtype).tiny)
    clamped = ratio > lam
    scale = torch.where(clamped, lam / ratio.clamp_min(torch.finfo(D.dtype).tiny), torch.ones_like(ratio))
    return D * scale, clamped


# ---- what each method subtracts ---------------------------------------------------------------
#
# With ``U = s B~`` (the learned update on ``Q``) and ``M = (W - W') Q = s D`` (the emulator's error on
# ``Q``): the adapter compensates the emulator's error when ``U`` points along ``M`` (``U ~ c M`` with
# ``c ~ 1``). On the original model that compensation is no longer needed, so it should be removed.

def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny


def column_coefficients(B_tilde: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Per column ``j`` the least-squares coefficient of the update on the mismatch,
    ``c_j = <s B~_j, M_j> / ||M_j||^2 = <B~_j, D_j> / ||D_j||^2`` (``s`` cancels); 0 where ``D_j = 0``.
    Shape ``(r,)``."""
    norms = (D * D).sum(0)
    return torch.where(norms > 0, (B_tilde * D).sum(0) / norms.clamp_min(_tiny(D)), torch.zeros_like(norms))


def column_cosines(B_tilde: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Per column cosine between ``B~_j`` and ``D_j`` (1: the update points along the emulator's error); 0 if
    either is 0."""
    denom = B_tilde.norm(dim=0) * D.norm(dim=0)
    return torch.where(denom > 0, (B_tilde * D).sum(0) / denom.clamp_min(_tiny(D)), torch.zeros_like(denom))


def aligned_mismatch(D: torch.Tensor, B_tilde: torch.Tensor) -> torch.Tensor:
    """The *aligned* target: ``clip(c_j, 0, 1) D_j`` per column, the part of the mismatch the adapter learned.

    The adapter's column is ``s B~_j = c_j M_j + (a part orthogonal to M_j)``; ``c_j M_j`` compensates the
    emulator's error, which the original model does not have, so only that part is removed (never more than
    the whole mismatch, never a negative multiple). A column with ``B~_j`` orthogonal to ``D_j`` is not moved.
    """
    return D * column_coefficients(B_tilde, D).clamp(0.0, 1.0)


def activation_aware_mismatch(W: torch.Tensor, W_emulated: torch.Tensor, Q: torch.Tensor, C: torch.Tensor,
                              s: float, rtol: float = 1e-10) -> torch.Tensor:
    """The *activation-aware* target ``D_C = (W - W') C Q (Q^T C Q)^+ / s`` (``out x r``).

    With ``A' = Q^T`` fixed and ``B^ = B~ - D_C``, it minimises the output difference between the original
    model with the corrected adapter and the fine-tuned emulator on the calibration activations ``X``
    (``C = X X^T``, ``in x in``): ``||((W + s B^ Q^T) - (W' + s B A)) X||_F``. The normal equations
    ``s D_C (Q^T C Q) = (W - W') C Q`` give the closed form; with ``C = I`` it is the official ``D``.
    """
    C = C.to(W.dtype)
    CQ = C @ Q
    gram = Q.T @ CQ
    return ((W - W_emulated) @ CQ) @ torch.linalg.pinv(gram, hermitian=True, rtol=rtol) / s


def _activation_aware_target(D, B_tilde, W, W_emulated, Q, s, C):
    if C is None:
        raise EmlocError("the activation_aware correction needs the calibration statistics C: "
                         "run `emloc calibrate` first")
    return activation_aware_mismatch(W, W_emulated, Q, C, s)


TargetFunction = Callable[..., torch.Tensor]
"""``(D, B_tilde, W, W_emulated, Q, s, C) -> target`` (``out x r``): what a method subtracts from ``B~``."""

CORRECTION_TARGETS: dict[str, TargetFunction] = {
    "official": lambda D, B_tilde, W, W_emulated, Q, s, C: D,
    "aligned": lambda D, B_tilde, W, W_emulated, Q, s, C: aligned_mismatch(D, B_tilde),
    "activation_aware": _activation_aware_target,
}
"""Method name -> target function; its keys are :data:`emloc.config.CORRECTION_METHODS`, in that order."""
assert tuple(CORRECTION_TARGETS) == CORRECTION_METHODS, ("emloc.config.CORRECTION_METHODS and "
                                                         "CORRECTION_TARGETS disagree")


def check_method(method: str) -> None:
    """A one-line error for a correction method that is not one of :data:`CORRECTION_METHODS`."""
    if method not in CORRECTION_TARGETS:
        raise EmlocError(f"correction method {method!r} is unknown: "
                         f"use one of {', '.join(CORRECTION_METHODS)}")


def correction_target(method: str, D: torch.Tensor, B_tilde: torch.Tensor, W: torch.Tensor,
                      W_emulated: torch.Tensor, Q: torch.Tensor, s: float,
                      C: torch.Tensor | None = None) -> torch.Tensor:
    """What ``method`` subtracts from ``B~`` before the clamp (``out x r``); ``D`` for the official
    correction."""
    check_method(method)
    return CORRECTION_TARGETS[method](D, B_tilde, W, W_emulated, Q, s, C)


# ---- one LoRA pair ---------------------------------------------------------------------------

@dataclass
class CorrectedPair:
    A: torch.Tensor
    """``A' = Q^T`` (``r x in``)."""
    B: torch.Tensor
    """``B^ = B~ - clamp(D_target)`` (``out x r``)."""
    Q: torch.Tensor
    B_tilde: torch.Tensor
    D: torch.Tensor
    """The whole mismatch ``(W - W') Q / s`` (``out x r``), whatever the method."""
    clamped: torch.Tensor
    D_target: torch.Tensor
    """What the method subtracts before the clamp (``D`` itself for the official correction)."""


def correct_lora_pair(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, W_emulated: torch.Tensor, s: float,
                      lam: float | None = 3.0, method: str = "official",
                      C: torch.Tensor | None = None) -> CorrectedPair:
    """The correction of one LoRA pair by ``method``, for any scaling ``s``: ``B^ = B~ - clamp(target)``,
    ``A' = Q^T``.

    ``A``: ``(r, in)``, ``B``: ``(out, r)``, ``W``, ``W_emulated``: ``(out, in)``; ``C`` (``in x in``) only
    for ``'activation_aware'``. Official and unclamped, ``(W + s B^ A') x = (W' + s B A) x`` for every ``x``
    in the row space of ``A``.
    """
    check_method(method)
    Q = orthonormal_row_basis(A)
    B_tilde = B @ (A @ Q)
    D = subspace_mismatch(W, W_emulated, Q, s)
    target = correction_target(method, D, B_tilde, W, W_emulated, Q, s, C)
    applied, clamped = clamp_columns(target, B_tilde, lam)
    return CorrectedPair(Q.T.contiguous(), B_tilde - applied, Q, B_tilde, D, clamped, target)


def clamp_summary(D: torch.Tensor, B_tilde: torch.Tensor, D_applied: torch.Tensor, clamped: torch.Tensor,
                  s: float, reference_norm: float) -> dict:
    """Per-module numbers: clamped columns, correction norm, and the misalignment on ``Q`` of the
    original+adapter vs the fine-tuned emulator, ``s ||D - D_applied||_F / ||W' Q + s B~||_F``,
    before (nothing applied) and after the correction."""
    tiny = torch.finfo(torch.float64).tiny
    return {
        "clamped_columns": int(clamped.sum()),
        "columns": int(clamped.numel()),
        "correction_norm": float(s * D_applied.norm()),
        "update_norm": float(s * B_tilde.norm()),
        "reference_norm": reference_norm,
        "misalignment_before": float(s * D.norm()) / max(reference_norm, tiny),
        "misalignment_after": float(s * (D - D_applied).norm()) / max(reference_norm, tiny),
    }


def pair_diagnostics(B_tilde: torch.Tensor, D: torch.Tensor, D_target: torch.Tensor, D_applied: torch.Tensor,
                     s: float) -> dict:
    """How the learned update ``U = s B~`` relates to the mismatch ``M = s D`` on ``Q``, and what the clamp
    did.

    - ``mismatch_norm`` ``||M||_F``; ``update_mismatch_cosine`` ``<U, M>_F / (||U|| ||M||)``;
    - ``update_mismatch_coefficient`` ``<U, M>_F / ||M||^2``: ``U ~ c M`` in least squares, the share of the
      emulator's error the adapter learned to compensate (1: all of it; 0: none);
    - ``column_coefficient_mean`` / ``column_cosine_mean``: the same per column, averaged;
    - ``clamp_shift_mean`` / ``clamp_shift_max``: per column ``||target_j - applied_j|| / ||target_j||``.
    """
    U, M = s * B_tilde, s * D
    inner, m2, u_norm, m_norm = float((U * M).sum()), float((M * M).sum()), float(U.norm()), float(M.norm())
    shift = (D_target - D_applied).norm(dim=0) / D_target.norm(dim=0).clamp_min(_tiny(D))
    shift = torch.where(D_target.norm(dim=0) > 0, shift, torch.zeros_like(shift))
    return {
        "mismatch_norm": m_norm,
        "update_mismatch_cosine": inner / (u_norm * m_norm) if u_norm * m_norm > 0 else 0.0,
        "update_mismatch_coefficient": inner / m2 if m2 > 0 else 0.0,
        "column_coefficient_mean": float(column_coefficients(B_tilde, D).mean()),
        "column_cosine_mean": float(column_cosines(B_tilde, D).mean()),
        "clamp_shift_mean": float(shift.mean()),
        "clamp_shift_max": float(shift.max()) if shift.numel() else 0.0,
    }


def pair_report(pair: CorrectedPair, W_emulated: torch.Tensor, s: float) -> dict:
    """One module's report row: :func:`clamp_summary`, the method's ``target_norm`` and
    :func:`pair_diagnostics`."""
    applied = pair.B_tilde - pair.B
    reference_norm = float((W_emulated @ pair.Q + s * pair.B_tilde).norm())
    return {**clamp_summary(pair.D, pair.B_tilde, applied, pair.clamped, s, reference_norm),
            "target_norm": float(s * pair.D_target.norm()),
            **pair_diagnostics(pair.B_tilde, pair.D, pair.D_target, applied, s)}


# ---- the adapter on a peft model --------------------------------------------------------------

def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA-wrapped modules by their name in the base model (``model.layers.0.self_attn.q_proj``)."""
    return {name: module for name, module in peft_model.get_base_model().named_modules()
            if isinstance(module, LoraLayer)}


@torch.no_grad()
def correct_adapter(peft_model: PeftModel, factors: EmulatorFactors, lam: float | None = 3.0,
                    adapter_name: str = "default", compute_dtype: torch.dtype = torch.float64,
                    method: str = "official", stats=None):
    """Correct, in place, the adapter loaded on the *original* model; returns (report, subspace tensors).

    Modules the emulator did not factor have ``W' = W`` and so ``D = 0``. ``method`` is one of
    :data:`CORRECTION_METHODS`; ``'activation_aware'`` needs ``stats`` (a ``CalibrationStats``). The report
    has one row per module with :func:`pair_report` columns; the tensors hold ``Q``, ``B_tilde``, ``D``,
    ``D_target`` and the per-column ``coefficient`` and ``cosine`` of each module.
    """
    check_method(method)
    if method == "activation_aware" and stats is None:
        raise EmlocError("the activation_aware correction needs the calibration statistics: "
                         "run `emloc calibrate` first")
    rows, tensors = [], {}
    layers = lora_layers(peft_model)
    unknown = [name for name in factors.u if name not in layers]
    if len(unknown) == len(factors.u):
        raise EmlocError("the adapter wraps none of the emulator's layers: "
                         "it belongs to another model or emulator")
    for name, layer in layers.items():
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        W = weight_matrix(layer.get_base_layer()).to(compute_dtype)
        W_emulated = factors.W_emulated(name).to(W.device, compute_dtype) if name in factors.u else W
        s = float(layer.scaling[adapter_name])
        C = None
        if method == "activation_aware":  # a module left dense has W' = W: no mismatch under any C
            C = stats.C(name).to(W.device) if name in factors.u else torch.eye(W.shape[1], device=W.device)
        pair = correct_lora_pair(lora_A.to(compute_dtype), lora_B.to(compute_dtype), W, W_emulated, s, lam,
                                 method, C)
        lora_A.copy_(pair.A.to(lora_A.dtype))
        lora_B.copy_(pair.B.to(lora_B.dtype))
        rows.append({"module": name, "layer": layer_index(name), "type": module_type(name), "scaling": s,
                     "method": method, **pair_report(pair, W_emulated, s)})
        tensors.update({f"{name}.Q": pair.Q.float(), f"{name}.B_tilde": pair.B_tilde.float(),
                        f"{name}.D": pair.D.float(),
                        f"{name}.D_target": pair.D_target.float(),
                        f"{name}.coefficient": column_coefficients(pair.B_tilde, pair.D).float(),
                        f"{name}.cosine": column_cosines(pair.B_tilde, pair.D).float()})
    return typed(pd.DataFrame(rows)), tensors


def reclamp_report(tensors: dict[str, torch.Tensor], report: pd.DataFrame, lam: float | None) -> pd.DataFrame:
    """The per-module report for another ``lambda``, from the saved ``B~`` and ``D`` (no model needed).

    When the tensors hold a method's ``D_target`` (any :func:`correct_adapter` run), that target is clamped.
    """
    rows = []
    for row in report.itertuples(index=False):
        D, B_tilde = tensors[f"{row.module}.D"].double(), tensors[f"{row.module}.B_tilde"].double()
        target = tensors.get(f"{row.module}.D_target", tensors[f"{row.module}.D"]).double()
        D_clamped, clamped = clamp_columns(target, B_tilde, lam)
        summary = clamp_summary(D, B_tilde, D_clamped, clamped, row.scaling, row.reference_norm)
        rows.append({"module": row.module, "layer": row.layer, "type": row.type, "scaling": row.scaling,
                     **summary})
    return pd.DataFrame(rows)
