"""Stage 1a: calibration statistics ``C = sum_t x_t x_t^T`` per distinct linear input.

Linears that read the same tensor (q/k/v, gate/up) share one ``C``: a module whose input is the
very tensor the previous hooked module just read joins that module's group.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from emloc.data import pad_batch
from emloc.errors import EmlocError
from emloc.families import is_linear_like, matches_target, resolve_targets


@dataclass
class CalibrationStats:
    """``covariances[leader]``: ``C`` (``in x in``, float32); ``input_of[module] -> leader``."""

    covariances: dict[str, torch.Tensor]
    input_of: dict[str, str]
    token_counts: dict[str, int]
    n_samples: int

    def C(self, module_name: str) -> torch.Tensor:
        return self.covariances[self.input_of[module_name]]


@dataclass
class PairedStats(CalibrationStats):
    """Sequential calibration: ``covariances`` holds the original's ``C = X X^T``; per leader, ``emulated``
    holds ``C~ = X~ X~^T`` and ``cross`` holds ``P = X X~^T`` (all ``in x in``, float32), where ``X`` and
    ``X~`` are the inputs of the same linear when the original and the emulator built so far run."""

    emulated: dict[str, torch.Tensor] = field(default_factory=dict)
    cross: dict[str, torch.Tensor] = field(default_factory=dict)

    def C_tilde(self, module_name: str) -> torch.Tensor:
        return self.emulated[self.input_of[module_name]]

    def P(self, module_name: str) -> torch.Tensor:
        return self.cross[self.input_of[module_name]]


def target_linears(model: nn.Module, patterns: list[str]) -> dict[str, nn.Module]:
    """The linear-like modules (``nn.Linear``, ``Conv1D``) matched by ``patterns`` (``'auto'``: every one
    inside the decoder blocks, :func:`emloc.families.resolve_targets`); an unmatched pattern is an error."""
    patterns = resolve_targets(model, patterns)
    found = {name: module for name, module in model.named_modules()
             if is_linear_like(module) and matches_target(name, patterns)}
    for pattern in patterns:
        if not any(matches_target(name, [pattern]) for name in found):
            raise EmlocError(f"target module pattern {pattern!r} matches no linear layer of this model: "
                             f"check the names with `model.named_modules()`")
    return found


class _Accumulator:
    def __init__(self, device: torch.device):
        self.device = device
        self.covariances: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.input_of: dict[str, str] = {}
        self.token_mask: torch.Tensor | None = None
        self._previous: tuple[torch.Tensor, str] | None = None
        self.captured: dict[str, torch.Tensor] | None = None
        """Paired mode: when a dict, the hooks store this forward's input rows per leader instead of adding
        them."""
        self.emulated: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}

    def begin_batch(self, token_mask: torch.Tensor | None) -> None:
        """Count only the tokens where ``token_mask`` is true (padding is left out) in the next forward."""
        self.token_mask = token_mask
        self._previous = None

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._previous is not None and self._previous[0] is x:
                self.input_of[name] = self.input_of[self._previous[1]]
                return
            self._previous = (x, name)
            self.input_of[name] = name
            rows = x.reshape(-1, x.shape[-1])
            # The mask is per text token; inputs of another shape (e.g. a vision tower's patches) are all
            # kept.
            if self.token_mask is not None and tuple(x.shape[:-1]) == tuple(self.token_mask.shape):
                rows = rows[self.token_mask.reshape(-1)]
            rows = rows.to(torch.float32)
            if self.captured is not None:
                self.captured[name] = rows
                return
            if name not in self.covariances:
                self.covariances[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64,
                                                     device=self.device)
                self.counts[name] = 0
            self.covariances[name] += (rows.T @ rows).to(torch.float64)
            self.counts[name] += rows.shape[0]
        return record

    def capture(self, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Start a forward whose input rows (``tokens x in`` per leader) land in the returned dict."""
        self.begin_batch(token_mask)
        self.captured = {}
        return self.captured

    def add_pair(self, X: dict[str, torch.Tensor], X_tilde: dict[str, torch.Tensor]) -> None:
        """Add one batch's ``X X^T``, ``X~ X~^T`` and ``X X~^T``; ``X``/``X~`` rows are the same tokens."""
        self.captured = None
        for name, rows in X.items():
            rows_tilde = X_tilde[name]
            if rows_tilde.shape != rows.shape:
                raise EmlocError(f"the emulator's inputs of {name} have shape {tuple(rows_tilde.shape)}, not "
                                 f"{tuple(rows.shape)}: both streams must run the same calibration batches")
            for into, product in ((self.covariances, rows.T @ rows),
                                  (self.emulated, rows_tilde.T @ rows_tilde),
                                  (self.cross, rows.T @ rows_tilde)):
                if name not in into:
                    into[name] = torch.zeros_like(product, dtype=torch.float64, device=self.device)
                into[name] += product.to(torch.float64)
            self.counts[name] = self.counts.get(name, 0) + rows.shape[0]


@contextlib.contextmanager
def recording_inputs(modules: dict[str, nn.Module], device: torch.device) -> Iterator[_Accumulator]:
    """Forward pre-hooks that accumulate ``C``; always removed on exit, even after an error."""
    accumulator = _Accumulator(device)
    handles = [module.register_forward_pre_hook(accumulator.hook(name)) for name, module in modules.items()]
    try:
        yield accumulator
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_statistics(model: nn.Module, features: list[dict[str, list[int]]], target_modules: list[str],
                       pad_token_id: int, batch_size: int = 8, progress: bool = True,
                       collate: Callable[[list[dict]], dict] | None = None) -> CalibrationStats:
    """Run ``model`` on tokenised calibration samples and return ``C`` per distinct linear input.

    ``collate`` turns a list of features into the model's keyword inputs (with ``attention_mask``);
    by default the features are padded token ids. A vision-language model passes one that adds
    ``pixel_values``.
    """
    if not features:
        raise EmlocError("the calibration set is empty: "
                         "set data.n_calibration >= 1 and provide training data")
    device = next(model.parameters()).device
    modules = target_linears(model, target_modules)
    with recording_inputs(modules, device) as accumulator:
        for start in tqdm(range(0, len(features), batch_size), desc="calibration", disable=not progress):
            batch = (collate
                     or (lambda chunk: pad_batch(chunk, pad_token_id)))(features[start:start + batch_size])
            inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            accumulator.begin_batch(inputs["attention_mask"].bool())
            model(**inputs)
    return stats_from_accumulator(accumulator, len(features))


def stats_from_accumulator(accumulator: _Accumulator, n_samples: int) -> CalibrationStats:
    """The accumulated ``C`` as float32 CPU tensors; non-finite statistics are an error."""
    covariances = {name: C.float().cpu() for name, C in accumulator.covariances.items()}
    for name, C in covariances.items():
        if not torch.isfinite(C).all():
            raise EmlocError(f"calibration statistics of {name} contain NaN or Inf: "
                             f"the model produced non-finite activations; "
                             f"check its weights and dtype (try --dtype float32)")
    return CalibrationStats(covariances, dict(accumulator.input_of), dict(accumulator.counts), n_samples)


def paired_stats_from_accumulator(accumulator: _Accumulator, n_samples: int) -> PairedStats:
    """The accumulated ``C``, ``C~`` and ``P`` as float32 CPU tensors (see :class:`PairedStats`)."""
    base = stats_from_accumulator(accumulator, n_samples)
    emulated, cross = ({name: M.float().cpu() for name, M in part.items()}
                       for part in (accumulator.emulated, accumulator.cross))
    for name in emulated:
        if not (torch.isfinite(emulated[name]).all() and torch.isfinite(cross[name]).all()):
            raise EmlocError(f"sequential statistics of {name} contain NaN or Inf: the emulator built so far "
                             f"produced non-finite activations; "
                             f"lower the compression or use calibration: independent")
    return PairedStats(base.covariances, base.input_of, base.token_counts, n_samples, emulated, cross)
