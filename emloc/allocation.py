"""Rank allocation: how many of each module's whitened singular values the emulator keeps.

Two rules under the same parameter budget (config ``emulator.allocation``):

- ``uniform`` (the official rule): every module keeps ``r = floor(rho * out * in / (out + in))``.
- ``global``: choose the ranks ``r_m`` that minimise the summed relative squared calibration error

      E(r) = sum_m w_m * tail_m(r_m) / total_m,
      tail_m(r) = sum_{i>r} sigma_{m,i}^2,   total_m = sum_i sigma_{m,i}^2

  subject to ``sum_m r_m (out_m + in_m) <= budget`` (the uniform rule's total at that ``rho``),
  ``1 <= r_m <= break-even rank``. ``sigma_{m,i}^2`` are the eigenvalues of ``M = W C W^T``
  (docs/architecture.md), so ``tail_m(r) / total_m`` is exactly the squared relative calibration error
  ``||(W - W')X||^2 / ||WX||^2``.

Why relative by default: modules have very different output energies (``total_m`` spans orders of
magnitude across q/k/v/o/MLP and depth), so an absolute objective would spend the whole budget on the
loudest modules. Pass ``weights`` (e.g. ``total_m``) for another weighting.

The greedy on marginal error reduction per parameter is optimal for this separable problem up to one
step: each module's gains ``sigma_{m,r+1}^2 / total_m`` fall with ``r`` (``sigma`` is sorted), so the
tails are convex and taking steps in order of gain per parameter solves the fractional relaxation; only
the last step that no longer fits the budget can separate it from the integer optimum.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emloc.calibration import CalibrationStats, target_linears
from emloc.config import EmulatorConfig
from emloc.errors import EmlocError
from emloc.lowrank import break_even_rank, rank_from_ratio, whitening_factor
from emloc.families import last_block_output, weight_matrix
from emloc.targets import excluded_modules, layer_index, module_type, ratio_for, typed



def max_rank(out_features: int, in_features: int, n_values: int | None = None) -> int:
    """The largest rank worth keeping: ``floor(out * in / (out + in))`` (beyond it ``u v`` outgrows ``W``)."""
    cap = max(1, math.floor(break_even_rank(out_features, in_features)))
    return cap if n_values is None else max(1, min(cap, n_values))


def uniform_ranks(shapes: dict[str, tuple[int, int]], rho: float,
                  ratio_patterns: dict | None = None) -> dict[str, int]:
    """The official rule per module: ``r = floor(rho_m * out * in / (out + in))``, ``rho_m`` from
    ``ratio_patterns``.

    ``shapes``: module -> ``(out, in)``.
    """
    config = EmulatorConfig(ratio=rho, ratio_patterns=dict(ratio_patterns or {}))
    return {name: rank_from_ratio(ratio_for(name, config), o, i) for name, (o, i) in shapes.items()}


def parameter_count(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """``sum_m r_m (out_m + in_m)``: the factors' parameters (biases are the same under every rule)."""
    return sum(ranks[name] * (o + i) for name, (o, i) in shapes.items())


def _tail_shares(sigma_sq: torch.Tensor) -> np.ndarray:
    """``tail(r) / total`` for ``r = 0..n`` (the squared relative error of keeping ``r``)."""
    energy = np.sort(np.clip(np.asarray(sigma_sq, dtype=np.float64), 0, None))[::-1]
    total = max(energy.sum(), np.finfo(np.float64).tiny)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return tail / total


def allocation_error(spectra_sq: dict[str, torch.Tensor], ranks: dict[str, int],
                     weights: dict[str, float] | None = None) -> float:
    """The objective ``E(r) = sum_m w_m tail_m(r_m) / total_m`` (``w_m = 1`` unless ``weights`` is given)."""
    return _objective({name: _tail_shares(spectra_sq[name]) for name in ranks}, ranks, weights)


def _objective(shares: dict[str, np.ndarray], ranks: dict[str, int],
               weights: dict[str, float] | None) -> float:
    return sum((1.0 if weights is None else float(weights[name]))
               * shares[name][min(rank, len(shares[name]) - 1)]
               for name, rank in ranks.items())


def global_ranks(spectra_sq: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int,
                 weights: dict[str, float] | None = None,
                 reference: dict[str, int] | None = None) -> dict[str, int]:
    """Ranks minimising ``E(r)`` (module docstring) with ``sum_m r_m (out_m + in_m) <= budget``.

    ``spectra_sq``: module -> whitened ``sigma^2`` (``n_m``, any order); ``shapes``: module -> ``(out, in)``.
    Greedy: every module starts at rank 1, then steps ``r -> r + 1`` are taken in decreasing order of
    ``w_m sigma_{m,r+1}^2 / (total_m (out_m + in_m))`` while they fit (a step that no longer fits is skipped,
    cheaper ones may still fit). Ranks never exceed :func:`max_rank`. When ``reference`` (e.g. the uniform
    rule's ranks, within the same budget) has a lower ``E``, it is returned instead: the greedy can lose to
    it by at most the one step that did not fit.
    """
    names = list(shapes)
    cost = np.array([o + i for o, i in shapes.values()], dtype=np.int64)
    spent = int(cost.sum())
    if spent > budget:
        raise EmlocError(f"a parameter budget of {budget} cannot give every module rank 1 (needs {spent}): "
                         f"raise emulator.ratio")
    shares_of = {n: _tail_shares(spectra_sq[n]) for n in names}
    shares = list(shares_of.values())
    module_of, gain = [], []
    for m, (name, (o, i)) in enumerate(shapes.items()):
        cap = max_rank(o, i, len(shares[m]) - 1)
        w = 1.0 if weights is None else float(weights[name])
        steps = w * (shares[m][1:cap] - shares[m][2:cap + 1])   # error removed by r -> r+1, r = 1..cap-1
        module_of.append(np.full(len(steps), m))
        gain.append(steps / cost[m])
    module_of, gain = np.concatenate(module_of), np.concatenate(gain)
    # stable: equal gains keep each module's steps in rank order, so ranks stay contiguous
    order = module_of[np.argsort(-gain, kind="stable")]
    ranks = np.ones(len(names), dtype=np.int64)
    left = budget - spent
    fits = np.cumsum(cost[order]) <= left
    first_miss = len(order) if fits.all() else int(np.argmin(fits))
    np.add.at(ranks, order[:first_miss], 1)
    left -= int(cost[order[:first_miss]].sum())
    # a module that missed once misses again: its cost is fixed, ``left`` shrinks
    for m in order[first_miss:]:
        if cost[m] <= left:
            ranks[m] += 1
            left -= int(cost[m])
        if left < cost.min():
            break
    result = {name: int(r) for name, r in zip(names, ranks)}
    if reference is not None and parameter_count(shapes, reference) <= budget and \
            _objective(shares_of, reference, weights) < _objective(shares_of, result, weights):
        return dict(reference)
    return result


def rank_table(spectra_sq: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
               ranks_uniform: dict[str, int], ranks_global: dict[str, int]) -> pd.DataFrame:
    """Per module: ``module, type, layer, rank_uniform, rank_global, error_uniform, error_global``.

    The errors are relative calibration errors ``sqrt(tail_m(r) / total_m)``, as ``whitened_error_at_rank``
    in the emulator report.
    """
    rows = []
    for name in shapes:
        shares = _tail_shares(spectra_sq[name])
        ru, rg = ranks_uniform[name], ranks_global[name]
        rows.append({"module": name, "type": module_type(name), "layer": layer_index(name),
                     "rank_uniform": ru, "rank_global": rg,
                     "error_uniform": math.sqrt(shares[min(ru, len(shares) - 1)]),
                     "error_global": math.sqrt(shares[min(rg, len(shares) - 1)])})
    return typed(pd.DataFrame(rows))


# ---- from a model and its calibration statistics ---------------------------------------------

@torch.no_grad()
def whitened_spectra_sq(model: nn.Module, stats: CalibrationStats, config: EmulatorConfig,
                        progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Per targeted module the squared whitened singular values ``eigvalsh(W C W^T)`` (descending,
    ``min(out, in)`` of them) and its shape ``(out, in)``.

    When ``out > in`` the same non-zero eigenvalues come from the smaller ``(W S)^T (W S)`` (``in x in``,
    ``C = S S^T``), with ``S`` computed once per shared input. Eigenvalues only: no factors are built.
    """
    compute = torch.float64 if config.compute_dtype == "float64" else torch.float32
    spectra, shapes, S_of = {}, {}, {}
    linears = target_linears(model, config.target_modules)
    # left dense: not part of the budget
    for name in excluded_modules(linears, config, last_block_output(model)):
        del linears[name]
    for name, linear in tqdm(linears.items(), desc="allocation", disable=not progress):
        W = weight_matrix(linear).to(compute)
        C = stats.C(name).to(W.device, compute)
        if W.shape[0] <= W.shape[1]:
            M = W @ C @ W.T
        else:
            leader = stats.input_of[name]
            if leader not in S_of:
                S_of = {leader: whitening_factor(C)}   # keep only the current shared input's S
            WS = W @ S_of[leader]
            M = WS.T @ WS
        eigenvalues = torch.linalg.eigvalsh((M + M.T) / 2).flip(0).clamp_min(0)
        spectra[name] = eigenvalues[:min(W.shape)].cpu()
        shapes[name] = tuple(W.shape)
    return spectra, shapes


def allocate(model: nn.Module, stats: CalibrationStats, config: EmulatorConfig,
             progress: bool = True) -> tuple[dict[str, int], dict[str, int]]:
    """``(global ranks, uniform ranks)`` for a model: the global rule within the uniform rule's budget."""
    spectra_sq, shapes = whitened_spectra_sq(model, stats, config, progress)
    uniform = uniform_ranks(shapes, config.ratio, config.ratio_patterns)
    return global_ranks(spectra_sq, shapes, parameter_count(shapes, uniform), reference=uniform), uniform


def allocation_at_ratio(report: pd.DataFrame, spectra: dict[str, dict[str, torch.Tensor]], rho: float,
                        ratio_patterns: dict | None = None) -> pd.DataFrame:
    """:func:`rank_table` at any ``rho`` from a built emulator's cached spectra (``factors.spectra``) and
    report (for the shapes): no decomposition, so a widget can call it on every slider move."""
    shapes = {m: (int(o), int(i))
              for m, o, i in zip(report["module"], report["out_features"], report["in_features"])}
    spectra_sq = {m: spectra[m]["whitened"].double().pow(2) for m in shapes}
    uniform = uniform_ranks(shapes, rho, ratio_patterns)
    ranks = global_ranks(spectra_sq, shapes, parameter_count(shapes, uniform), reference=uniform)
    return rank_table(spectra_sq, shapes, uniform, ranks)
