"""emloc.statistics: the t / Wilson fallbacks (the bootstrap itself is tested in test_sweeps.py)."""
import math

import numpy as np
import pytest

from emloc.statistics import bootstrap_ci, t_interval, wilson_interval


def test_intervals():
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 32)[0] == 0 and wilson_interval(0, 32)[1] > 0
    low, high = t_interval([1.0, 2.0, 3.0])
    assert high - 2 == pytest.approx(4.303 / math.sqrt(3))
    assert t_interval([0.5]) == (0.5, 0.5)


def test_wilson_and_bootstrap_agree_on_one_large_seed():
    """One seed of many items: the item bootstrap and the Wilson interval estimate the same binomial spread."""
    correct = (np.arange(400) % 10 < 3).astype(float)       # accuracy 0.3 on 400 items
    _, low, high = bootstrap_ci([correct[None]], n_boot=4000)
    w_low, w_high = wilson_interval(int(correct.sum()), correct.size)
    assert low == pytest.approx(w_low, abs=0.01) and high == pytest.approx(w_high, abs=0.01)
