"""Small statistics helpers for benchmark tables (pure functions, numpy only)."""
from __future__ import annotations

import numpy as np


def bootstrap_interval(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval of per-item scores over seeds and test items.

    ``values``: shape ``(n_items,)`` or ``(n_seeds, n_items)`` (e.g. 0/1 correctness, or the paired
    difference of two settings on the same items). A 2-D array is resampled as a crossed design:
    seeds (rows) and items (columns) are drawn with replacement independently, so the interval covers
    both training noise and the finite test set. Returns ``(mean, low, high)``.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-D or 2-D array, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    n_seeds, n_items = x.shape
    rows = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    cols = rng.integers(0, n_items, size=(n_boot, n_items))
    # mean over the resampled grid = mean over resampled rows of (row means over resampled columns)
    means = np.array([x[np.ix_(r, c)].mean() for r, c in zip(rows, cols)]) if n_seeds > 1 else x[0][cols].mean(1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(x.mean()), float(low), float(high)
