"""emloc.statistics: seed-level intervals, their coverage, paired differences, gap closed, Wilson, bootstrap."""
import math

import numpy as np
import pytest

from emloc.statistics import (accuracy_interval, bootstrap_ci, comparison_sentence, gap_closed_interval, paired_difference,
                              ratio_of_means_interval, seed_interval, t_interval, t_quantile, verdict, wilson_interval)


def test_intervals():
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 32)[0] == 0 and wilson_interval(0, 32)[1] > 0
    low, high = t_interval([1.0, 2.0, 3.0])
    assert high - 2 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t_{0.975, 2}
    assert t_interval([0.5]) == (0.5, 0.5)


def test_wilson_and_bootstrap_agree_on_one_large_seed():
    """One seed of many items: the item bootstrap and the Wilson interval estimate the same binomial spread."""
    correct = (np.arange(400) % 10 < 3).astype(float)       # accuracy 0.3 on 400 items
    _, low, high = bootstrap_ci([correct[None]], n_boot=4000)
    w_low, w_high = wilson_interval(int(correct.sum()), correct.size)
    assert low == pytest.approx(w_low, abs=0.01) and high == pytest.approx(w_high, abs=0.01)


# ---- seed-level intervals (issue 24): coverage, paired differences, gap closed, sentences ---------------

def test_t_quantile_matches_published_values():
    # two-sided 95% (df 1, 2, 4, 30) and 99% (df 2) critical values from standard tables
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.995, 2) == pytest.approx(9.9248, abs=1e-4)
    assert t_quantile(0.025, 3) == pytest.approx(-t_quantile(0.975, 3))


def _simulated_seed_means(rng, n_data: int, n_seeds: int, n_items: int = 60, mean: float = 0.45,
                          seed_sd: float = 0.12) -> np.ndarray:
    """``(n_data, n_seeds)`` per-seed accuracies of two-level data: each seed has its own accuracy
    (``mean`` + a normal seed effect) and its own test items, scored 0/1 (the nested design of a sweep)."""
    accuracy = np.clip(mean + seed_sd * rng.standard_normal((n_data, n_seeds)), 0.0, 1.0)
    return rng.binomial(n_items, accuracy) / n_items


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_seed_interval_covers_95_percent_on_simulated_two_level_data(n_seeds):
    rng = np.random.default_rng(n_seeds)
    means = _simulated_seed_means(rng, 4000, n_seeds)
    truth = 0.45  # the clip at 0 and 1 is never reached at 3.75 seed sd: E[accuracy] is the mean
    covered = [low <= truth <= high for _, low, high in map(seed_interval, means)]
    assert 0.93 <= np.mean(covered) <= 0.97, np.mean(covered)


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_paired_difference_covers_95_percent(n_seeds):
    """Two variants scored on the same seeds: a shared seed effect cancels in the difference."""
    rng = np.random.default_rng(10 + n_seeds)
    shared = 0.1 * rng.standard_normal((4000, n_seeds))
    a = np.clip(0.50 + shared + 0.03 * rng.standard_normal((4000, n_seeds)), 0, 1)
    b = np.clip(0.45 + shared + 0.03 * rng.standard_normal((4000, n_seeds)), 0, 1)
    a, b = rng.binomial(100, a) / 100, rng.binomial(100, b) / 100
    covered = [low <= 0.05 <= high for _, low, high in (paired_difference(x, y) for x, y in zip(a, b))]
    assert 0.93 <= np.mean(covered) <= 0.97, np.mean(covered)


def test_paired_difference_edge_cases():
    assert paired_difference([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]) == pytest.approx((0.1, 0.1, 0.1))  # no spread
    mean, low, high = paired_difference([0.29, 0.09, 0.03], [0.0, 0.0, 0.0])  # the per-seed gains
    assert mean == pytest.approx(0.1367, abs=1e-4) and low < 0 < high
    assert verdict(low, high) == "within noise"
    mean, low, high = paired_difference([0.5], [0.4])  # one seed: no interval, so no verdict either
    assert mean == pytest.approx(0.1) and np.isnan(low) and np.isnan(high) and verdict(low, high) == "within noise"
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.1, 0.2], [0.1])


def test_gap_closed_is_a_ratio_of_means_and_undefined_for_a_doubtful_gap():
    zero, full = [0.0, 0.05, 0.02], [0.80, 0.84, 0.78]
    variant = [0.40, 0.47, 0.38]
    closed = gap_closed_interval(variant, zero, full)
    gained, gap = np.mean(variant) - np.mean(zero), np.mean(full) - np.mean(zero)
    assert closed["defined"] and closed["estimate"] == pytest.approx(gained / gap)
    assert closed["low"] < closed["estimate"] < closed["high"]
    # a small gap whose interval reaches zero (sweep_reduced printed 1.333 [-1.0, 6.0] from a 0.025 gap)
    small = gap_closed_interval([0.05, 0.03, 0.04], [0.0, 0.02, 0.01], [0.04, -0.01, 0.06])
    assert not small["defined"] and np.isnan(small["estimate"]) and "not above zero" in small["reason"]
    negative = gap_closed_interval([0.1, 0.1], [0.5, 0.52], [0.3, 0.31])
    assert not negative["defined"] and "not above zero" in negative["reason"]
    zero_gap = gap_closed_interval([0.1, 0.2], [0.3, 0.3], [0.3, 0.3])
    assert not zero_gap["defined"]
    one_seed = gap_closed_interval([0.4], [0.0], [0.8])
    assert not one_seed["defined"] and "one seed" in one_seed["reason"]


def test_ratio_of_means_covers_its_ratio_and_names_a_doubtful_denominator():
    # transfer kept: transfer accuracy over emulator + LoRA's, the ratio of means (not the mean of ratios)
    rng = np.random.default_rng(3)
    hits, trials = 0, 2000
    for _ in range(trials):
        denominator = 0.8 + 0.05 * rng.standard_normal(5)
        numerator = 0.6 * denominator + 0.04 * rng.standard_normal(5)
        kept = ratio_of_means_interval(numerator, denominator)
        hits += kept["low"] <= 0.6 <= kept["high"]
    assert 0.93 <= hits / trials <= 0.97
    kept = ratio_of_means_interval([0.3, 0.5, 0.4], [0.6, 0.8, 0.7])
    assert kept["estimate"] == pytest.approx(0.4 / 0.7)
    doubtful = ratio_of_means_interval([0.1, 0.1, 0.1], [0.05, -0.04, 0.02], denominator_name="accuracy")
    assert not doubtful["defined"] and doubtful["reason"].startswith("undefined: accuracy ")
    assert "one seed: accuracy's spread" in ratio_of_means_interval([0.1], [0.5], denominator_name="accuracy")[
        "reason"]


def test_comparison_sentences_come_from_the_interval():
    assert verdict(0.01, 0.09) == "beats" and verdict(-0.09, -0.01) == "worse"
    assert verdict(-0.02, 0.05) == "within noise" and verdict(float("nan"), 1.0) == "within noise"
    assert verdict(-0.5, -0.1, higher_is_better=False) == "beats"  # a loss: lower is better
    text = comparison_sentence("corrected", "uncorrected", (0.051, 0.012, 0.090), seeds=5)
    assert text == "corrected beats uncorrected on accuracy: +0.051 [+0.012, +0.090], 5 seeds"
    noise = comparison_sentence("corrected", "uncorrected", (0.02, -0.03, 0.07))
    assert noise.startswith("corrected and uncorrected are within noise of each other")
    one = comparison_sentence("a", "b", paired_difference([0.3], [0.1]), seeds=1)
    assert one == "a and b are within noise of each other on accuracy: +0.200 (no interval, 1 seed)"


def test_accuracy_interval_is_t_over_seeds_or_wilson_for_one_seed():
    mean, low, high, kind = accuracy_interval([0.02, 0.0, 0.04], correct=0, items=100)
    assert kind == "t" and mean == pytest.approx(0.02) and low == 0.0 < high  # clipped at 0
    assert (low, high) == (0.0, seed_interval([0.02, 0.0, 0.04])[2])
    assert accuracy_interval([0.3], correct=30, items=100) == (0.3, *wilson_interval(30, 100), "wilson")
