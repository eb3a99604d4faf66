"""Stage 3: LoRA correction (DESIGN §2) as pure functions, plus the driver over a peft model.

peft's update is ``dW = s B A`` with ``A: (r, in)``, ``B: (out, r)``. With ``Q`` an orthonormal basis
(``in x r``) of the row space of ``A``: ``B A = B~ Q^T`` with ``B~ = B A Q``. The mismatch inside that
subspace is ``D = (W - W') Q / s``; the corrected pair is ``A' = Q^T``, ``B^ = B~ - clamp(D)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from emloc.emulator import EmulatorFactors, layer_index, module_type
from emloc.errors import EmlocError


def orthonormal_row_basis(A: torch.Tensor) -> torch.Tensor:
    """``Q`` (``in x r``) with orthonormal columns spanning the row space of ``A`` (``r x in``)."""
    Q, _ = torch.linalg.qr(A.T, mode="reduced")
    return Q


def subspace_mismatch(W: torch.Tensor, W_emulated: torch.Tensor, Q: torch.Tensor, s: float) -> torch.Tensor:
    """``D = (W - W') Q / s`` (``out x r``): what the original does differently on the adapter's inputs."""
    return (W - W_emulated) @ Q / s


def clamp_columns(D: torch.Tensor, B_tilde: torch.Tensor, lam: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column ``j``: if ``mean|D_j| / mean|B~_j| > lam``, scale ``D_j`` by ``lam / ratio_j``.

    Returns the clamped ``D`` and a boolean mask of the clamped columns. ``lam=None``: no clamp.
    """
    if lam is None:
        return D, torch.zeros(D.shape[1], dtype=torch.bool, device=D.device)
    ratio = D.abs().mean(0) / B_tilde.abs().mean(0).clamp_min(torch.finfo(D.dtype).tiny)
    clamped = ratio > lam
    scale = torch.where(clamped, lam / ratio.clamp_min(torch.finfo(D.dtype).tiny), torch.ones_like(ratio))
    return D * scale, clamped


@dataclass
class CorrectedPair:
    A: torch.Tensor
    """``A' = Q^T`` (``r x in``)."""
    B: torch.Tensor
    """``B^ = B~ - clamp(D)`` (``out x r``)."""
    Q: torch.Tensor
    B_tilde: torch.Tensor
    D: torch.Tensor
    clamped: torch.Tensor


def correct_lora_pair(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, W_emulated: torch.Tensor, s: float,
                      lam: float | None = 3.0) -> CorrectedPair:
    """The EMLoC correction of one LoRA pair, for any scaling ``s``.

    Unclamped, ``(W + s B^ A') x = (W' + s B A) x`` for every ``x`` in the row space of ``A``.
    """
    Q = orthonormal_row_basis(A)
    B_tilde = B @ (A @ Q)
    D = subspace_mismatch(W, W_emulated, Q, s)
    D_clamped, clamped = clamp_columns(D, B_tilde, lam)
    return CorrectedPair(Q.T.contiguous(), B_tilde - D_clamped, Q, B_tilde, D, clamped)


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


def pair_report(pair: CorrectedPair, W_emulated: torch.Tensor, s: float) -> dict:
    reference_norm = float((W_emulated @ pair.Q + s * pair.B_tilde).norm())
    return clamp_summary(pair.D, pair.B_tilde, pair.B_tilde - pair.B, pair.clamped, s, reference_norm)


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA-wrapped modules by their name in the base model (``model.layers.0.self_attn.q_proj``)."""
    return {name: module for name, module in peft_model.get_base_model().named_modules() if isinstance(module, LoraLayer)}


@torch.no_grad()
def correct_adapter(peft_model: PeftModel, factors: EmulatorFactors, lam: float | None = 3.0,
                    adapter_name: str = "default", compute_dtype: torch.dtype = torch.float64):
    """Correct, in place, the adapter loaded on the *original* model; returns (report, subspace tensors).

    Modules the emulator did not factor have ``W' = W`` and so ``D = 0``.
    """
    rows, tensors = [], {}
    layers = lora_layers(peft_model)
    unknown = [name for name in factors.u if name not in layers]
    if len(unknown) == len(factors.u):
        raise EmlocError("the adapter wraps none of the emulator's layers: it belongs to another model or emulator")
    for name, layer in layers.items():
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        W = layer.get_base_layer().weight.to(compute_dtype)
        W_emulated = factors.W_emulated(name).to(W.device, compute_dtype) if name in factors.u else W
        s = float(layer.scaling[adapter_name])
        pair = correct_lora_pair(lora_A.to(compute_dtype), lora_B.to(compute_dtype), W, W_emulated, s, lam)
        lora_A.copy_(pair.A.to(lora_A.dtype))
        lora_B.copy_(pair.B.to(lora_B.dtype))
        rows.append({"module": name, "layer": layer_index(name), "type": module_type(name), "scaling": s,
                     **pair_report(pair, W_emulated, s)})
        tensors.update({f"{name}.Q": pair.Q.float(), f"{name}.B_tilde": pair.B_tilde.float(), f"{name}.D": pair.D.float()})
    return pd.DataFrame(rows), tensors


def reclamp_report(tensors: dict[str, torch.Tensor], report: pd.DataFrame, lam: float | None) -> pd.DataFrame:
    """The per-module report for another ``lambda``, from the saved ``B~`` and ``D`` (no model needed)."""
    rows = []
    for row in report.itertuples(index=False):
        D, B_tilde = tensors[f"{row.module}.D"].double(), tensors[f"{row.module}.B_tilde"].double()
        D_clamped, clamped = clamp_columns(D, B_tilde, lam)
        summary = clamp_summary(D, B_tilde, D_clamped, clamped, row.scaling, row.reference_norm)
        rows.append({"module": row.module, "layer": row.layer, "type": row.type, "scaling": row.scaling, **summary})
    return pd.DataFrame(rows)
