"""emloc.sweep_tables: transfer kept and one-axis comparisons, on hand-made per-seed results."""
import math

import pandas as pd
import pytest

from emloc import sweep_tables
from emloc.statistics import paired_difference


def _seeds(values: dict) -> pd.DataFrame:
    """``{(calibration, variant): [accuracy per seed]}`` -> a seeds table with loss = 1 - accuracy."""
    rows = [{"seed": seed, "emulator.calibration": calibration, "variant": variant, "accuracy": accuracy,
             "loss": 1.0 - accuracy, "items": 100, "correct": round(100 * accuracy)}
            for (calibration, variant), per_seed in values.items() for seed, accuracy in enumerate(per_seed)]
    return pd.DataFrame(rows)


SEEDS = _seeds({
    ("independent", "emulator_lora"): [0.80, 0.85, 0.90],
    ("independent", "transfer_uncorrected"): [0.40, 0.50, 0.45],
    ("independent", "transfer_corrected"): [0.42, 0.48, 0.50],
    ("sequential", "emulator_lora"): [0.82, 0.86, 0.88],
    ("sequential", "transfer_uncorrected"): [0.60, 0.70, 0.65],
    ("sequential", "transfer_corrected"): [0.41, 0.47, 0.52],
})


def test_transfer_kept_is_the_ratio_of_means_to_emulator_lora():
    kept = sweep_tables.kept_table(SEEDS, ["emulator.calibration"]).set_index(["emulator.calibration", "variant"])
    row = kept.loc[("independent", "transfer_uncorrected")]
    assert row["kept"] == pytest.approx(0.45 / 0.85) and row["defined"]
    assert row["ci_low"] < row["kept"] < row["ci_high"] and row["seeds"] == 3


def test_transfer_kept_is_undefined_when_the_emulator_learned_nothing_measurable():
    seeds = _seeds({("independent", "emulator_lora"): [0.0, 0.02, 0.0],
                    ("independent", "transfer_uncorrected"): [0.0, 0.01, 0.0]})
    row = sweep_tables.kept_table(seeds, ["emulator.calibration"]).iloc[0]
    assert not row["defined"] and math.isnan(row["kept"])
    assert row["reason"].startswith("undefined: emulator + LoRA's accuracy")


def test_axis_table_pairs_each_value_with_the_reference_point_by_seed():
    table = sweep_tables.axis_table(SEEDS, ["emulator.calibration"])
    assert set(table["value"]) == {"sequential"} and set(table["reference"]) == {"independent"}
    assert set(table["variant"]) == set(sweep_tables.AXIS_VARIANTS)
    row = table[(table["variant"] == "transfer_uncorrected") & (table["metric"] == "accuracy")].iloc[0]
    expected = paired_difference([0.60, 0.70, 0.65], [0.40, 0.50, 0.45])
    assert (row["difference"], row["ci_low"], row["ci_high"]) == pytest.approx(expected)
    assert row["verdict"] == "beats" and row["sentence"].startswith(
        "emulator.calibration=sequential beats emulator.calibration=independent on transfer_uncorrected accuracy")
    loss = table[(table["variant"] == "transfer_uncorrected") & (table["metric"] == "loss")].iloc[0]
    assert loss["verdict"] == "beats"  # lower loss is better
    corrected = table[(table["variant"] == "transfer_corrected") & (table["metric"] == "accuracy")].iloc[0]
    assert corrected["verdict"] == "within noise"


def test_axis_table_compares_only_points_that_differ_in_that_axis_alone():
    other = SEEDS.assign(**{"emulator.ratio": 0.5})
    shifted = other[other["emulator.calibration"] == "sequential"].assign(**{"emulator.ratio": 0.4})
    # the sequential point sits at another ratio: it differs from the reference in two axes, no comparison
    table = sweep_tables.axis_table(pd.concat([other[other["emulator.calibration"] == "independent"], shifted]),
                                    ["emulator.calibration", "emulator.ratio"])
    assert table.empty
    assert sweep_tables.axis_table(SEEDS.assign(**{"emulator.method": "plain"}), ["emulator.method"]).empty
