"""Confidence intervals by a two-level bootstrap: resample seeds, then test items within each seed.

Pure numpy functions. A *group* is one seed's results: an array ``(k, n_items)`` of per-item scores
(e.g. 0/1 correctness) for ``k`` quantities measured on the same items (variants of one run), so
paired statistics such as the share of the accuracy gap closed keep their pairing.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def bootstrap_means(groups: Sequence[np.ndarray], n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """``(n_boot, k)`` item-weighted means over resampled seeds and items.

    Each replicate draws ``len(groups)`` seeds with replacement and, per seed, ``n_items`` items with
    replacement (a seed drawn twice reuses its item draw: a cheap, slightly conservative shortcut).
    """
    rng = np.random.default_rng(seed)
    n_groups = len(groups)
    sums = np.stack([g[:, rng.integers(0, g.shape[1], (n_boot, g.shape[1]))].sum(-1).T for g in groups])  # (S, B, k)
    sizes = np.array([g.shape[1] for g in groups], dtype=float)
    counts = np.stack([np.bincount(row, minlength=n_groups) for row in rng.integers(0, n_groups, (n_boot, n_groups))])
    if n_groups == 1:
        counts = np.ones((n_boot, 1))
    totals = np.einsum("bs,sbk->bk", counts, sums)
    return totals / (counts @ sizes)[:, None]


def bootstrap_ci(groups: Sequence[np.ndarray], statistic: Callable[[np.ndarray], float] = lambda m: m[0],
                 n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic`` of the pooled means and its percentile interval.

    ``statistic`` maps the ``k`` means to one number (default: the first mean).
    """
    groups = [np.asarray(g, dtype=float).reshape(-1, np.shape(g)[-1]) for g in groups]
    pooled = np.concatenate(groups, axis=1).mean(1)
    estimate = float(statistic(pooled))
    replicates = np.array([statistic(m) for m in bootstrap_means(groups, n_boot, seed)], dtype=float)
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
