"""Confidence intervals: the two-level bootstrap (resample seeds, then test items), and its fallbacks.

Pure numpy functions, the one statistics module of the project (sweep tables, seed tables, the correction
sweep, the results board). The bootstrap needs per-item scores; when only per-seed means exist (a
``results.json`` without the task data to re-score its predictions), :func:`t_interval` (several seeds) and
:func:`wilson_interval` (one seed) are the documented fallbacks.

A *group* is one seed's results: an array ``(k, n_items)`` of per-item scores (e.g. 0/1 correctness) for
``k`` quantities measured on the same items (variants of one run), so paired statistics such as the share
of the accuracy gap closed or the difference of two corrections keep their pairing.

Two designs: each seed has its own test items (``shared_items=False``, nested: items are redrawn within
each seed), or every seed is scored on the same test items (``shared_items=True``, crossed: one item draw
per replicate serves all seeds, so the between-item spread is not averaged away over seeds).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (larger df use the normal 1.96).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


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
            raise ValueError(f"shared_items needs the same number of items in every group, "
                             f"got {sorted(set(sizes))}")
        shared = rng.integers(0, groups[0].shape[1], (n_boot, groups[0].shape[1]))
        draws = [shared] * n_groups
    else:
        draws = [rng.integers(0, g.shape[1], (n_boot, g.shape[1])) for g in groups]
    sums = np.stack([g[:, draw].sum(-1).T for g, draw in zip(groups, draws)])  # (S, B, k)
    counts = np.stack([np.bincount(row, minlength=n_groups)
                       for row in rng.integers(0, n_groups, (n_boot, n_groups))])
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
    replicates = np.array([statistic(m) for m in bootstrap_means(groups, n_boot, seed, shared_items)],
                          dtype=float)
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


# ---- fallbacks when no per-item scores exist ----------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (one seed: accuracy on ``n`` test items)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_interval(values: list[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean of ``values`` (several seeds); a point when only one."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()), float(x.mean()))
    t = _T95[len(x) - 2] if len(x) - 1 <= len(_T95) else 1.96
    half = t * x.std(ddof=1) / math.sqrt(len(x))
    return (float(x.mean() - half), float(x.mean() + half))
