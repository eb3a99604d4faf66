"""End-to-end fidelity of an emulator: how far its outputs drift from the original model's.

The per-layer calibration error (emulator report) is measured on the *original* model's inputs to each
layer. In the emulator every layer reads the already drifted output of the layers before it, so the
errors compound. Two measures on the same held-out token sequences, both models teacher-forced:

- ``next_token_kl``: per-token ``KL(p_original || p_emulator)`` of the next-token distributions;
- ``residual_drift``: per decoder layer ``l``, ``||h_l - h~_l||_F / ||h_l||_F`` of the residual stream
  after layer ``l`` (``h``: original, ``h~``: emulator), over all non-pad tokens.

Positions: a position ``t`` of a sequence counts for the KL when a real token follows it (the last
token of each sequence predicts nothing in the data and is left out). It is a ``response`` position
when that next token is a labelled response token (where the training loss is taken), else a
``prompt`` position; ``all`` is both. Features without ``labels`` have prompt positions only.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from emloc.baselines import SkippedLayer
from emloc.data import IGNORE_INDEX, pad_batch
from emloc.errors import EmlocError
from emloc.models import find_decoder_layers

POSITIONS = ("all", "prompt", "response")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers in order (:func:`emloc.models.find_decoder_layers`, so any Hugging Face causal LM),
    without the ones the layer_drop baseline replaced (:class:`emloc.baselines.SkippedLayer`): such an
    emulator has fewer layers than its original, and residual drift compares them one to one."""
    layers = find_decoder_layers(model, "fidelity needs a Hugging Face causal LM").layers
    return [layer for layer in layers if not isinstance(layer, SkippedLayer)]


@contextlib.contextmanager
def recording_layer_outputs(layers: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Forward hooks that collect each layer's output hidden states (``batch x seq x hidden``) in order;
    always removed on exit. Hooks, not ``output_hidden_states``: its last entry is after the final norm."""
    outputs: list[torch.Tensor] = []

    def record(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)
    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def position_masks(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``(batch, seq)`` boolean masks of the KL positions (module docstring) for a right-padded batch."""
    mask = batch["attention_mask"].bool()
    has_next = torch.zeros_like(mask)
    has_next[:, :-1] = mask[:, 1:]
    labels = batch.get("labels")
    response = torch.zeros_like(mask)
    if labels is not None:
        response[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    response &= has_next
    return {"all": has_next, "prompt": has_next & ~response, "response": response}


def _paired_batches(original: nn.Module, emulator: nn.Module, features: list[dict], pad_token_id: int,
                    batch_size: int, progress: bool, desc: str):
    """Yield ``(batch, (logits, layer_outputs) of the original, (logits, layer_outputs) of the emulator)``."""
    if not features:
        raise EmlocError("no held-out samples to measure fidelity on: pass at least one tokenised example")
    pairs = [(model, decoder_layers(model), next(model.parameters()).device)
             for model in (original, emulator)]
    if len(pairs[0][1]) != len(pairs[1][1]):
        raise EmlocError(f"the emulator has {len(pairs[1][1])} decoder layers and the original "
                         f"{len(pairs[0][1])}: residual drift compares layer by layer; use an SVD emulator, "
                         f"not layer_drop")
    for start in tqdm(range(0, len(features), batch_size), desc=desc, disable=not progress):
        batch = pad_batch(features[start:start + batch_size], pad_token_id)
        results = []
        for model, layers, device in pairs:
            with recording_layer_outputs(layers) as outputs:
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            results.append((logits, list(outputs)))
        yield batch, results[0], results[1]


def _token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` per row of ``(n, vocab)`` logits; tiny negative
    rounding -> 0."""
    log_p = F.log_softmax(logits_p.to(dtype), dim=-1)
    log_q = F.log_softmax(logits_q.to(log_p.device, dtype), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).clamp_min(0)


def _summary(values: list[float], agree: list[bool]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "top1_agreement": None, "tokens": 0}
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p90": float(np.quantile(x, 0.9)),
            "top1_agreement": float(np.mean(agree)), "tokens": int(len(x))}


class _KL:
    """Accumulates per-token KL and top-1 agreement per position kind."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.values = {kind: [] for kind in POSITIONS}
        self.agree = {kind: [] for kind in POSITIONS}

    def add(self, batch: dict, original: tuple, emulator: tuple) -> None:
        """``original``/``emulator``: ``(logits, layer outputs)`` of each model on ``batch``."""
        logits_p, logits_q = original[0], emulator[0]
        for kind, mask in position_masks(batch).items():
            p, q = logits_p[mask.to(logits_p.device)], logits_q[mask.to(logits_q.device)]
            self.values[kind] += _token_kl(p, q, self.dtype).cpu().tolist()
            self.agree[kind] += (p.argmax(-1).cpu() == q.argmax(-1).cpu()).tolist()

    def result(self) -> dict:
        return {kind: _summary(self.values[kind], self.agree[kind]) for kind in POSITIONS}


class _Drift:
    """Accumulates ``sum ||h_l - h~_l||^2`` and ``sum ||h_l||^2`` per layer over non-pad tokens."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.difference: list[float] = []
        self.energy: list[float] = []

    def add(self, batch: dict, original: tuple, emulator: tuple) -> None:
        """``original``/``emulator``: ``(logits, layer outputs)`` of each model on ``batch``."""
        hidden_p, hidden_q = original[1], emulator[1]
        mask = batch["attention_mask"].bool()
        if not self.energy:
            self.difference, self.energy = [0.0] * len(hidden_p), [0.0] * len(hidden_p)
        for layer, (h, h_tilde) in enumerate(zip(hidden_p, hidden_q)):
            h = h[mask.to(h.device)].to(self.dtype)
            h_tilde = h_tilde[mask.to(h_tilde.device)].to(h.device, self.dtype)
            self.difference[layer] += float((h - h_tilde).pow(2).sum())
            self.energy[layer] += float(h.pow(2).sum())

    def result(self) -> pd.DataFrame:
        energy = np.maximum(np.asarray(self.energy), np.finfo(np.float64).tiny)
        return pd.DataFrame({"layer": np.arange(len(energy)),
                             "relative_error": np.sqrt(np.asarray(self.difference) / energy),
                             "hidden_norm": np.sqrt(energy)})


def _measure(accumulators: list, original: nn.Module, emulator: nn.Module, features: list[dict],
             pad_token_id: int, batch_size: int, progress: bool, label: str) -> list:
    """One pass of both models over ``features``, each batch given to every accumulator; their results."""
    for batch, outputs_p, outputs_q in _paired_batches(original, emulator, features, pad_token_id, batch_size,
                                                       progress, label):
        for accumulator in accumulators:
            accumulator.add(batch, outputs_p, outputs_q)
    return [accumulator.result() for accumulator in accumulators]


@torch.no_grad()
def next_token_kl(original: nn.Module, emulator: nn.Module, features: list[dict], pad_token_id: int,
                  batch_size: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True) -> dict:
    """Per-token ``KL(p_original || p_emulator)`` on tokenised held-out samples (``input_ids``, optional
    ``labels``). Returns ``{kind: {mean, median, p90, top1_agreement, tokens}}`` for ``kind`` in
    ``all, prompt, response`` (positions: module docstring); ``top1_agreement`` is the share of positions
    where both models' most likely next token is the same. Each model runs on its own device."""
    return _measure([_KL(dtype)], original, emulator, features, pad_token_id, batch_size, progress,
                    "fidelity: KL")[0]


@torch.no_grad()
def residual_drift(original: nn.Module, emulator: nn.Module, features: list[dict], pad_token_id: int,
                   batch_size: int = 8, dtype: torch.dtype = torch.float64,
                   progress: bool = True) -> pd.DataFrame:
    """One row per decoder layer ``l``: ``relative_error = ||h_l - h~_l||_F / ||h_l||_F`` of the residual
    stream after layer ``l`` over every non-pad token (``h_l``: ``tokens x hidden``), and ``hidden_norm``
    ``= ||h_l||_F``. Both models read the same tokens; the emulator's layers read its own drifted states."""
    return _measure([_Drift(dtype)], original, emulator, features, pad_token_id, batch_size, progress,
                    "fidelity: drift")[0]


@torch.no_grad()
def fidelity_report(original: nn.Module, emulator: nn.Module, features: list[dict], pad_token_id: int,
                    batch_size: int = 8, progress: bool = True) -> dict:
    """Both measures in one pass over ``features``, JSON-able for ``fidelity.json``:
    ``{"kl": next_token_kl(...), "drift": [{layer, relative_error, hidden_norm}, ...], "samples": n}``."""
    kl, drift = _measure([_KL(torch.float32), _Drift(torch.float64)], original, emulator, features,
                         pad_token_id, batch_size, progress, "fidelity")
    return {"kl": kl, "drift": drift.to_dict(orient="records"), "samples": len(features)}


def drift_table(report: dict) -> pd.DataFrame:
    """The ``drift`` records of a fidelity report as a DataFrame indexed by layer."""
    return pd.DataFrame(report["drift"]).set_index("layer")


def fidelity_by_layer(report: dict, emulator_report: pd.DataFrame,
                      module_type: str | None = None) -> pd.DataFrame:
    """Per layer, the end-to-end ``drift`` next to the mean and max per-layer ``calibration_error`` of the
    layer's modules (or of one ``module_type``) from the emulator build report: the compounding picture."""
    rows = emulator_report if module_type is None else emulator_report[emulator_report["type"] == module_type]
    if rows.empty:
        raise EmlocError(f"no module of type {module_type!r} in the emulator report: pick one of "
                         f"{', '.join(dict.fromkeys(emulator_report['type']))}")
    calibration = rows.groupby("layer")["calibration_error"].agg(calibration_error_mean="mean",
                                                                 calibration_error_max="max")
    drift = drift_table(report)[["relative_error"]].rename(columns={"relative_error": "drift"})
    return drift.join(calibration)
