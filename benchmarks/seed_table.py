"""Accuracy of the five variants over several finished runs (one per seed), with 95% intervals.

    python benchmarks/seed_table.py runs/demo runs/demo_seed1 runs/demo_seed2

Per-item correctness is recomputed from each run's saved predictions with the task's own checker
(``emloc.evaluation.item_correctness``); intervals come from the two-level bootstrap (seeds, then test
items) of ``emloc.statistics``, and the share of the zero-shot -> LoRA-on-the-original gap closed keeps
the pairing of variants per item.
"""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from emloc.evaluation import item_correctness
from emloc.pipeline import VARIANTS, Run
from emloc.statistics import bootstrap_ci, gap_closed


def correctness(run: Run) -> np.ndarray:
    """``(len(VARIANTS), n_items)`` 0/1 array of one run's exact-match results."""
    items = item_correctness(run.results(), run.data)
    return np.array([items[v] for v in VARIANTS], dtype=float)


def seed_table(directories: list[str]) -> pd.DataFrame:
    groups = [correctness(Run(d, progress=False)) for d in directories]
    rows = []
    for i, variant in enumerate(VARIANTS):
        mean, low, high = bootstrap_ci(groups, statistic=lambda m, i=i: m[i])
        row = {"variant": variant, "accuracy": mean, "ci_low": low, "ci_high": high}
        if variant not in ("zero_shot", "full_lora"):
            zero, full = VARIANTS.index("zero_shot"), VARIANTS.index("full_lora")
            closed = bootstrap_ci(groups, statistic=lambda m, i=i: gap_closed(np.array([m[i], m[zero], m[full]])))
            row.update(gap_closed=closed[0], gap_low=closed[1], gap_high=closed[2])
        rows.append(row)
    corrected, uncorrected = VARIANTS.index("transfer_corrected"), VARIANTS.index("transfer_uncorrected")
    effect = bootstrap_ci(groups, statistic=lambda m: m[corrected] - m[uncorrected])
    table = pd.DataFrame(rows).set_index("variant")
    table.attrs["correction_effect"] = effect
    table.attrs["seeds"], table.attrs["items"] = len(groups), sum(g.shape[1] for g in groups)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run directories, one per seed")
    args = parser.parse_args()
    table = seed_table(args.runs)
    print(f"{table.attrs['seeds']} seed(s), {table.attrs['items']} test items in all; 95% bootstrap intervals")
    print(table.to_markdown(floatfmt=".3f"))
    estimate, low, high = table.attrs["correction_effect"]
    print(f"transfer_corrected - transfer_uncorrected (paired): {estimate:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
