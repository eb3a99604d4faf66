"""Accuracy of the variants over several finished runs (one per seed), with 95% intervals over seeds.

    python benchmarks/seed_table.py runs/demo runs/demo_seed1 runs/demo_seed2

Per-item correctness is recomputed from each run's saved predictions with the task's own checker
(``emloc.evaluation.item_correctness``); each seed is one observation, its accuracy over its test items, and
the intervals are Student-t over seeds (``emloc.statistics``): ``seed_interval`` for the accuracy,
``gap_closed_interval`` for the share of the zero-shot -> LoRA-on-the-original gap closed (a ratio of means
over seeds, undefined with the reason when the gap's own interval is not above zero, or with one seed), and
``paired_difference`` with its ``verdict`` for transfer_corrected minus transfer_uncorrected (paired by
seed, on the same test items). With one seed the accuracy interval is the single value and the comparison
has no interval.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd

from emloc.statistics import (ACCURACY, comparison_sentence, gap_closed_interval, paired_difference, seed_interval,
                              verdict)

GAP_ENDS = ("zero_shot", "full_lora")
INTERVAL_NOTE = ("95% intervals: Student-t over seeds (one observation per seed); gap closed: ratio of means "
                 "over seeds; corrected minus uncorrected: paired by seed on the same test items")


def correctness(run) -> dict[str, np.ndarray]:
    """``variant -> 0/1 array over the test items`` of one run's exact-match results."""
    from emloc.evaluation import item_correctness
    return {variant: np.asarray(items, dtype=float)
            for variant, items in item_correctness(run.results(), run.data).items()}


def table_from_seeds(seeds: list[dict[str, np.ndarray]], variants: list[str] | None = None) -> pd.DataFrame:
    """The seed table from per-seed, per-variant item correctness (one dict per seed): accuracy per variant
    with its interval over seeds, the share of the gap closed and, in ``attrs``, the correction's effect."""
    if variants is None:
        from emloc.pipeline import VARIANTS
        variants = list(VARIANTS)
    variants = [v for v in variants if all(v in seed for seed in seeds)]
    accuracy = {v: np.array([float(np.mean(seed[v])) for seed in seeds]) for v in variants}
    rows = []
    for variant in variants:
        mean, low, high = seed_interval(accuracy[variant], bounds=ACCURACY)
        row = {"variant": variant, "accuracy": mean, "ci_low": low, "ci_high": high}
        if variant not in GAP_ENDS and all(end in accuracy for end in GAP_ENDS):
            closed = gap_closed_interval(accuracy[variant], *(accuracy[end] for end in GAP_ENDS))
            row.update(gap_closed=closed["estimate"], gap_low=closed["low"], gap_high=closed["high"],
                       gap_defined=closed["defined"], gap_reason=closed["reason"])
        rows.append(row)
    table = pd.DataFrame(rows).set_index("variant")
    table.attrs["seeds"] = len(seeds)
    table.attrs["items"] = sum(len(seed[variants[0]]) for seed in seeds) if variants else 0
    if {"transfer_corrected", "transfer_uncorrected"} <= set(accuracy):
        effect = paired_difference(accuracy["transfer_corrected"], accuracy["transfer_uncorrected"])
        table.attrs["correction_effect"] = effect
        table.attrs["correction_verdict"] = verdict(*effect[1:]) if len(seeds) > 1 else "1 seed"
    return table


def seed_table(directories: list[str]) -> pd.DataFrame:
    from emloc.pipeline import Run
    return table_from_seeds([correctness(Run(d, progress=False)) for d in directories])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories, one per seed")
    args = parser.parse_args()
    table = seed_table(args.runs)
    seeds = table.attrs["seeds"]
    print(f"{seeds} seed(s), {table.attrs['items']} test items in all; {INTERVAL_NOTE}"
          + ("; one seed: the interval is the single value, the comparison has none" if seeds == 1 else ""))
    print(table.drop(columns=["gap_defined", "gap_reason"], errors="ignore").to_markdown(floatfmt=".3f"))
    for variant, reason in table.get("gap_reason", pd.Series(dtype=object)).items():
        if isinstance(reason, str) and reason:
            print(f"gap closed by {variant}: {reason}")
    if "correction_effect" in table.attrs:
        effect = table.attrs["correction_effect"]
        if seeds > 1 and math.isfinite(effect[1]):
            print(comparison_sentence("transfer_corrected", "transfer_uncorrected", effect, seeds=seeds))
        else:
            print(f"transfer_corrected - transfer_uncorrected: {effect[0]:+.3f} "
                  "(1 seed: no interval, no verdict)")


if __name__ == "__main__":
    main()
