"""Confidence intervals by a two-level bootstrap: resample seeds, then test items.

Pure numpy functions, the one bootstrap of the project (sweep tables, seed tables, the correction sweep).
A *group* is one seed's results: an array ``(k, n_items)`` of per-item scores (e.g. 0/1 correctness) for
``k`` quantities measured on the same items (variants of one run), so paired statistics such as the share
of the accuracy gap closed or the difference of two corrections keep their pairing.

Two designs: each seed has its own test items (``shared_items=False``, nested: items are redrawn within
each seed), or every seed is scored on the same test items (``shared_items=True``, crossed: one item draw
per replicate serves all seeds, so the between-item spread is not averaged away over seeds).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def bootstrap_means(groups: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0,
                    shared_items: bool = False) -> np.ndarray:
    """``(n_boot, k)`` item-weighted means over resampled seeds and items.

    Each replicate draws ``len(groups)`` seeds with replacement and ``n_items`` items with replacement:
    per seed (a seed drawn twice reuses its item draw: a cheap, slightly conservative shortcut), or once
    for all seeds when ``shared_items`` (then every group must have the same items, in the same order).
    """
    rng = np.random.default_rng(seed)
    n_groups = len(groups)
    sizes = np.array([g.shape[1] for g in groups], dtype=float)
    if shared_items:
        if len(set(sizes)) != 1:
            raise ValueError(f"shared_items needs the same number of items in every group, got {sorted(set(sizes))}")
        shared = rng.integers(0, groups[0].shape[1], (n_boot, groups[0].shape[1]))
        draws = [shared] * n_groups
    else:
        draws = [rng.integers(0, g.shape[1], (n_boot, g.shape[1])) for g in groups]
    sums = np.stack([g[:, draw].sum(-1).T for g, draw in zip(groups, draws)])  # (S, B, k)
    counts = np.stack([np.bincount(row, minlength=n_groups) for row in rng.integers(0, n_groups, (n_boot, n_groups))])
    if n_groups == 1:
        counts = np.ones((n_boot, 1))
    totals = np.einsum("bs,sbk->bk", counts, sums)
    return totals / (counts @ sizes)[:, None]


def bootstrap_ci(groups: Sequence[np.ndarray], statistic: Callable[[np.ndarray], float] = lambda m: m[0],
                 n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                shared_items: bool = False) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic`` of the pooled means and its percentile interval.

    ``statistic`` maps the ``k`` means to one number (default: the first mean); see ``bootstrap_means``
    for ``shared_items``.
    """
    groups = [np.asarray(g, dtype=float).reshape(-1, np.shape(g)[-1]) for g in groups]
    pooled = np.concatenate(groups, axis=1).mean(1)
    estimate = float(statistic(pooled))
    replicates = np.array([statistic(m) for m in bootstrap_means(groups, n_boot, seed, shared_items)], dtype=float)
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return estimate, float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return estimate, float(low), float(high)


def gap_closed(means: np.ndarray) -> float:
    """``(acc - zero_shot) / (full_lora - zero_shot)`` from ``means = [acc, zero_shot, full_lora]``."""
    denominator = means[2] - means[1]
    return float((means[0] - means[1]) / denominator) if denominator != 0 else float("nan")
