"""The benchmark scripts' summaries use the seed-level statistics of emloc.statistics (issue 24): intervals
over per-seed values, differences paired by seed, the gap closed as a ratio of means, and no interval where
there is no per-seed value to measure."""
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emloc.statistics import gap_closed_interval, paired_difference, seed_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import correction_sweep  # noqa: E402
import emulator_fidelity  # noqa: E402
import seed_table  # noqa: E402


# ---- correction sweep ---------------------------------------------------------------------------------

def _runs(scores: dict[str, list[str]], task: str = "addition", steps: int = 100) -> pd.DataFrame:
    """A ``runs.csv`` frame: per setting one 0/1 string per seed (seeds 0, 1, ...)."""
    rows = [{"task": task, "ratio": 0.5, "steps": steps, "seed": seed, "setting": setting,
             "accuracy": correct.count("1") / len(correct), "loss": math.nan, "n": len(correct),
             "update_mismatch_cosine": 1e-3, "update_mismatch_coefficient": 1e-4, "correct": correct}
            for setting, per_seed in scores.items() for seed, correct in enumerate(per_seed)]
    return pd.DataFrame(rows)


UNCORRECTED = ["1100000000", "1110000000", "1111110000"]       # 0.2, 0.3, 0.6
OFFICIAL_L3 = ["1000000000", "1100000000", "1111100000"]       # 0.1, 0.2, 0.5


def _row(table: pd.DataFrame, setting: str) -> dict:
    return table[table["setting"] == setting].iloc[0].to_dict()


def test_correction_interval_is_seed_interval_of_per_seed_accuracy():
    table = correction_sweep.summary_table(_runs({"uncorrected": UNCORRECTED, "official_l3": OFFICIAL_L3}))
    cell = _row(table, "uncorrected")["accuracy"]
    mean, low, high = seed_interval([0.2, 0.3, 0.6])
    assert (cell["mean"], cell["low"], cell["high"], cell["seeds"]) == (
        pytest.approx(mean), pytest.approx(max(low, 0.0)), pytest.approx(high), 3)  # an accuracy: clipped at 0
    # wider than the per-seed spread: not a percentile interval that stops at the extreme seeds
    assert low < 0 == cell["low"] and cell["high"] > 0.6


def test_correction_difference_is_paired_by_seed_with_verdict():
    table = correction_sweep.summary_table(_runs({"uncorrected": UNCORRECTED, "official_l3": OFFICIAL_L3}))
    difference = _row(table, "official_l3")["accuracy_minus_uncorrected"]
    expected = paired_difference([0.1, 0.2, 0.5], [0.2, 0.3, 0.6])   # -0.1 on every seed: no spread
    assert difference["mean"] == pytest.approx(expected[0]) == pytest.approx(-0.1)
    assert difference["verdict"] == "worse"
    markdown = correction_sweep.summary_markdown(table)
    assert "Student-t over seeds" in markdown and "paired by seed" in markdown
    assert "| worse |" in markdown


def test_correction_difference_of_identical_settings_is_zero_within_noise():
    table = correction_sweep.summary_table(_runs({"uncorrected": UNCORRECTED, "aligned": list(UNCORRECTED)}))
    difference = _row(table, "aligned")["accuracy_minus_uncorrected"]
    assert difference["mean"] == 0 and difference["seeds"] == 3
    assert difference["verdict"] == "within noise"


def test_correction_one_seed_says_so():
    runs = _runs({"uncorrected": ["1100000000"], "official_l3": ["1110000000"]})
    table = correction_sweep.summary_table(runs)
    row = _row(table, "official_l3")
    assert row["accuracy"]["seeds"] == 1 and row["accuracy"]["low"] == row["accuracy"]["high"] == 0.3
    assert row["accuracy_minus_uncorrected"]["verdict"] == "1 seed"
    markdown = correction_sweep.summary_markdown(table)
    line = next(line for line in markdown.splitlines() if "| official_l3 |" in line)
    assert "| 0.300 (1 seed) | +0.100 (1 seed) | 1 seed |" in line


def test_correction_summary_has_loss_only_where_stored():
    runs = _runs({"uncorrected": UNCORRECTED, "official_l3": OFFICIAL_L3})
    assert "loss (95% CI)" not in correction_sweep.summary_markdown(correction_sweep.summary_table(runs))
    runs["loss"] = [1.0, 1.2, 1.4, 1.5, 1.7, 1.9]   # official_l3 loses 0.5 on every seed
    row = _row(correction_sweep.summary_table(runs), "official_l3")
    assert row["loss"]["mean"] == pytest.approx(1.7)
    assert row["loss_minus_uncorrected"]["mean"] == pytest.approx(0.5)
    assert row["loss_minus_uncorrected"]["verdict"] == "worse"   # higher loss is worse


# ---- emulator fidelity -------------------------------------------------------------------------------

def _points(variant: list[float], zero: list[float], full: list[float], full_loss: list[float],
            source: str | None = "per seed", setting: str = "default") -> pd.DataFrame:
    """Trained points of one group (one row per seed)."""
    rows = []
    for seed, (v, z, f, fl) in enumerate(zip(variant, zero, full, full_loss)):
        row = {"task": "addition", "ratio": 0.5, "seed": seed, "setting": setting, "steps": 100,
               "trained": True,
               "kl_all": 0.3 + 0.01 * seed, "kl_response": 0.2, "top1_agreement": 0.7, "drift_last": 0.2,
               "emulator_accuracy": 0.0, "emulator_loss": 4.0 + 0.1 * seed,
               "zero_shot_accuracy": z, "zero_shot_loss": 4.0 + 0.1 * seed,
               "emulator_lora_accuracy": v, "emulator_lora_loss": 1.0 + 0.1 * seed,
               "transfer_uncorrected_accuracy": v, "transfer_uncorrected_loss": 1.0 + 0.1 * seed,
               "transfer_corrected_accuracy": v, "transfer_corrected_loss": 1.1 + 0.1 * seed,
               "full_lora_accuracy": f, "full_lora_loss": fl,
               # the per-seed share a mean of ratios would average
               "transfer_corrected_gap_closed": (v - z) / (f - z)}
        if source is not None:
            row["full_lora_loss_source"] = source
        rows.append(row)
    return pd.DataFrame(rows)


def _measure(tidy: pd.DataFrame, measure: str) -> dict:
    return tidy[tidy["trained"].astype(bool) & (tidy["measure"] == measure)].iloc[0].to_dict()


def test_fidelity_gap_closed_is_the_ratio_of_means():
    variant, zero, full = [0.36, 0.07, 0.3], [0.0, 0.0, 0.0], [0.4, 0.7, 0.55]
    points = _points(variant, zero, full, [0.1, 0.12, 0.09])
    mean_of_ratios = np.mean([(v - z) / (f - z) for v, z, f in zip(variant, zero, full)])
    ratio_of_means = np.mean(variant) / np.mean(full)
    assert abs(mean_of_ratios - ratio_of_means) > 0.05     # the case tells the two apart
    row = _measure(emulator_fidelity.intervals(points), "transfer_corrected_gap_closed")
    expected = gap_closed_interval(variant, zero, full)
    assert row["mean"] == pytest.approx(ratio_of_means) == pytest.approx(expected["estimate"])
    assert row["ci_low"] == pytest.approx(expected["low"])
    assert row["ci_high"] == pytest.approx(expected["high"])
    assert row["defined"] and row["seeds"] == 3


def test_fidelity_gap_closed_undefined_when_the_gap_is_not_above_zero():
    points = _points([0.1, 0.3, 0.0], [0.1, 0.2, 0.1], [0.3, 0.1, 0.15], [0.1, 0.12, 0.09])
    row = _measure(emulator_fidelity.intervals(points), "transfer_corrected_gap_closed")
    assert not row["defined"] and math.isnan(row["mean"]) and math.isnan(row["ci_low"])
    assert "not above zero" in row["reason"]


def test_fidelity_full_lora_from_a_sweep_mean_gets_no_interval():
    legacy = _points([0.1, 0.3, 0.5], [0.0] * 3, [0.8, 0.9, 0.85], [0.093] * 3, source=None)
    for points in (legacy, legacy.assign(full_lora_loss_source=emulator_fidelity.SWEEP_MEAN)):
        tidy = emulator_fidelity.intervals(points)
        row = _measure(tidy, "full_lora_loss")
        assert row["mean"] == pytest.approx(0.093) and not row["defined"]
        assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])
        assert emulator_fidelity.SWEEP_MEAN in row["reason"]
        loss_gap = _measure(tidy, "transfer_corrected_loss_gap_closed")
        assert not loss_gap["defined"] and math.isnan(loss_gap["ci_low"])
        # the accuracy, stored per seed, keeps its interval
        assert _measure(tidy, "full_lora_accuracy")["defined"]
    per_seed = emulator_fidelity.intervals(_points([0.1, 0.3, 0.5], [0.0] * 3, [0.8, 0.9, 0.85],
                                                   [0.09, 0.1, 0.095]))
    row = _measure(per_seed, "full_lora_loss")
    assert row["defined"] and row["ci_low"] < row["mean"] < row["ci_high"]


def test_reference_full_lora_reads_per_seed_loss_when_stored(tmp_path):
    items = pd.DataFrame({"seed": [0, 0, 1, 1], "variant": "full_lora", "item": [0, 1, 0, 1],
                          "correct": [1, 0, 1, 1]})
    items.to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame({"variant": ["zero_shot", "full_lora"], "loss": [4.0, 0.093]}).to_csv(tmp_path / "loss.csv",
                                                                                      index=False)
    reference = emulator_fidelity.reference_full_lora(tmp_path, 1)
    assert reference == {"accuracy": 1.0, "loss": 0.093, "loss_source": emulator_fidelity.SWEEP_MEAN}
    pd.DataFrame({"seed": [0, 1], "variant": "full_lora", "loss": [0.09, 0.1]}).to_csv(tmp_path / "seeds.csv",
                                                                                      index=False)
    reference = emulator_fidelity.reference_full_lora(tmp_path, 1)
    assert reference == {"accuracy": 1.0, "loss": 0.1, "loss_source": emulator_fidelity.PER_SEED}


def test_fidelity_summary_files_keep_intervals_consistent(tmp_path, monkeypatch):
    monkeypatch.setattr(emulator_fidelity, "RESULTS", tmp_path)
    _points([0.1, 0.3, 0.5], [0.0] * 3, [0.8, 0.9, 0.85], [0.093] * 3, source=None).to_csv(
        tmp_path / "points.csv", index=False)
    emulator_fidelity.summarize()
    tidy = pd.read_csv(tmp_path / "intervals.csv")
    assert {"task", "ratio", "setting", "steps", "trained", "measure", "mean", "ci_low", "ci_high",
            "seeds", "defined", "reason"} <= set(tidy.columns)
    assert ((tidy["ci_low"] <= tidy["mean"] + 1e-9) & (tidy["mean"] <= tidy["ci_high"] + 1e-9)).all()
    assert "full_lora_loss" not in set(tidy["measure"])
    missing = pd.read_csv(tmp_path / "no_interval.csv")
    assert "full_lora_loss" in set(missing["measure"]) and not missing["defined"].any()
    text = (tmp_path / "summary.md").read_text()
    assert "ratio of means" in text and "0.093 (no interval)" in text


# ---- seed table --------------------------------------------------------------------------------------

def _seed(zero, uncorrected, corrected, full) -> dict:
    return {name: np.array(list(bits), dtype=float) for name, bits in
            (("zero_shot", zero), ("transfer_uncorrected", uncorrected), ("transfer_corrected", corrected),
             ("full_lora", full))}


VARIANTS = ["zero_shot", "transfer_uncorrected", "transfer_corrected", "full_lora"]


def test_seed_table_uses_seed_level_statistics():
    seeds = [_seed("0000", "1000", "1100", "1110"), _seed("0000", "1000", "1000", "1111"),
             _seed("1000", "1100", "1110", "1111")]
    table = seed_table.table_from_seeds(seeds, VARIANTS)
    corrected = [0.5, 0.25, 0.75]
    mean, low, high = seed_interval(corrected, bounds=(0.0, 1.0))  # an accuracy: clipped to [0, 1]
    row = table.loc["transfer_corrected"]
    assert (row["accuracy"], row["ci_low"], row["ci_high"]) == (pytest.approx(mean), pytest.approx(low),
                                                                 pytest.approx(high))
    closed = gap_closed_interval(corrected, [0.0, 0.0, 0.25], [0.75, 1.0, 1.0])
    assert row["gap_closed"] == pytest.approx(closed["estimate"]) and row["gap_defined"]
    assert row["gap_closed"] == pytest.approx(np.mean([0.5, 0.25, 0.5]) / np.mean([0.75, 1.0, 0.75]))
    effect = table.attrs["correction_effect"]
    assert effect == pytest.approx(paired_difference(corrected, [0.25, 0.25, 0.5]))
    assert table.attrs["correction_verdict"] == "within noise"
    assert table.attrs["seeds"] == 3 and table.attrs["items"] == 12


def test_seed_table_identical_transfers_are_within_noise_and_flat_gap_undefined():
    seeds = [_seed("1000", "1100", "1100", "1000"), _seed("1000", "1000", "1000", "1100"),
             _seed("1100", "1110", "1110", "1100")]
    table = seed_table.table_from_seeds(seeds, VARIANTS)
    assert table.attrs["correction_effect"][0] == 0
    assert table.attrs["correction_verdict"] == "within noise"
    row = table.loc["transfer_corrected"]
    assert not row["gap_defined"] and math.isnan(row["gap_closed"]) and "not above zero" in row["gap_reason"]


# ---- the paper's schedule (benchmarks/schedule_tables.py) -----------------------------------------------

import correction_diagnostics  # noqa: E402
import schedule_tables  # noqa: E402
from emloc import io, provenance, sweep_tables, sweeps  # noqa: E402

SCHEDULE_VARIANTS = {"zero_shot": 0.0, "emulator": 0.0, "emulator_lora": 0.8, "transfer_uncorrected": 0.5,
                     "transfer_corrected": 0.6, "full_lora": 0.9}


def _stored_sweep(folder: Path, steps: int, shift: float, axis: str | None) -> None:
    """A sweep's seeds.csv and provenance record: 3 seeds, accuracies near ``SCHEDULE_VARIANTS`` (+ ``shift``
    but for LoRA on the original)."""
    rows = [{"seed": seed, **({axis: steps} if axis else {}), "variant": variant,
             "accuracy": value + (shift if variant != "full_lora" else 0.0) + 0.01 * seed if value else 0.0,
             "loss": 1.0 - value,
             "items": 100, "correct": 0}
            for seed in range(3) for variant, value in SCHEDULE_VARIANTS.items()]
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "seeds.csv", index=False)
    provenance.write(folder, provenance.record({"p": {"preset": "standard", "lora": {"steps": steps}}}))


def test_schedule_sources_get_every_axis_from_their_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule_tables, "RESULTS", tmp_path)
    _stored_sweep(tmp_path / "long", 300, 0.0, "lora.steps")
    _stored_sweep(tmp_path / "short", 100, -0.4, None)   # steps not an axis there: read from its settings
    seeds = schedule_tables.combined_seeds(["short", "long", "absent"])
    assert set(seeds["lora.steps"]) == {100, 300} and set(seeds["task"]) == {"addition"}
    assert (seeds.iloc[0][list(schedule_tables.REFERENCE)] == pd.Series(schedule_tables.REFERENCE)).all()
    axes = list(schedule_tables.AXES)[1:]
    tables = sweep_tables.all_tables(seeds.drop(columns="task"), axes)
    findings = schedule_tables.half_gap_findings(tables, axes)
    gap = tables["gap"].set_index(["lora.steps", "variant"])
    long, short = gap.loc[(300, "transfer_corrected")], gap.loc[(100, "transfer_corrected")]
    assert long["ci_low"] > 0.5 and short["ci_high"] < 0.5
    assert "lora.steps=300" in findings[0] and "closes more than half the gap" in findings[0]
    assert "lora.steps=100" in findings[1] and "closes less than half the gap" in findings[1]
    assert "keeps" in findings[0] and "correction on - off" in findings[0]
    said = schedule_tables.axis_findings(tables["axes"])
    assert said and all(s.startswith("lora.steps=100 is worse than lora.steps=300") for s in said)
    table = schedule_tables.point_table(tables, axes)
    assert list(table["lora.steps"]) == [300, 100] and (table["seeds"] == 3).all()


def test_schedule_compares_the_steps_at_a_second_ratio_too(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule_tables, "RESULTS", tmp_path)
    _stored_sweep(tmp_path / "long", 300, 0.0, "lora.steps")
    _stored_sweep(tmp_path / "short", 100, -0.4, None)
    at_half = schedule_tables.combined_seeds(["short", "long"]).drop(columns="task")
    at_lower = at_half.assign(**{"emulator.ratio": 0.4})
    at_lower.loc[at_lower["lora.steps"] == 100, "accuracy"] += 0.35  # 100 steps as good as 300 at ratio 0.4
    seeds = pd.concat([at_half, at_lower], ignore_index=True)
    axes = list(schedule_tables.AXES)[1:]
    steps = schedule_tables.steps_at_other_ratios(seeds, axes)
    assert set(steps["axis"]) == {"lora.steps"} and set(steps["emulator.ratio"]) == {0.4}
    assert set(steps["value"]) == {100} and set(steps["reference"]) == {300}
    corrected = steps[(steps["variant"] == "transfer_corrected") & (steps["metric"] == "accuracy")].iloc[0]
    assert corrected["sentence"].startswith("at emulator.ratio=0.4: lora.steps=100 is worse than lora.steps=300")
    assert corrected["difference"] == pytest.approx(-0.05)
    assert schedule_tables.steps_at_other_ratios(at_half, axes).empty


def test_schedule_calibration_table_pairs_sequential_with_independent(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule_tables, "RESULTS", tmp_path)
    _stored_sweep(tmp_path / "long", 300, 0.0, "lora.steps")
    independent = schedule_tables.combined_seeds(["long"]).drop(columns="task")
    sequential = independent.assign(**{"emulator.calibration": "sequential"})
    sequential["accuracy"] += [0.02 * seed for seed in sequential["seed"]]  # a gain that grows with the seed
    axes = list(schedule_tables.AXES)[1:]
    tables = sweep_tables.all_tables(pd.concat([independent, sequential], ignore_index=True), axes)
    table = schedule_tables.calibration_table(tables["axes"])
    row = table[(table["variant"] == "transfer_corrected") & (table["metric"] == "accuracy")].iloc[0]
    assert row["sequential - independent"].startswith("0.020 [") and row["seeds"] == 3
    assert row["sequential - independent"].endswith("within noise")  # 0, 0.02, 0.04: the interval holds 0
    assert schedule_tables.calibration_table(pd.DataFrame()).empty


def test_fidelity_settings_are_compared_with_the_default_paired_by_seed():
    default = _points([0.1, 0.3, 0.5, 0.2], [0.0] * 4, [0.8] * 4, [0.1] * 4)
    other = _points([0.2, 0.3, 0.4, 0.9], [0.0] * 4, [0.8] * 4, [0.1] * 4, setting="sequential")
    other["kl_all"] = default["kl_all"] - [0.20, 0.21, 0.19, 0.5]
    other = other[other["seed"] < 3].iloc[::-1]   # seed 3 has no partner; rows out of order
    differences = emulator_fidelity.setting_differences(pd.concat([default, other], ignore_index=True))
    assert set(differences["setting"]) == {"sequential"} and (differences["seeds"] == 3).all()
    kl = differences[differences["measure"] == "kl_all"].iloc[0]
    expected = paired_difference(np.array([0.1, 0.1, 0.13]), np.array([0.3, 0.31, 0.32]))
    assert (kl["mean"], kl["ci_low"], kl["ci_high"]) == pytest.approx(expected)
    assert kl["verdict"] == "beats" and not kl["trained"]          # lower KL is better
    assert "sequential beats default on kl all" in kl["sentence"]
    accuracy = differences[(differences["measure"] == "transfer_corrected_accuracy")].iloc[0]
    assert accuracy["mean"] == pytest.approx(0.0) and accuracy["verdict"] == "within noise" and accuracy["trained"]
    assert "within noise" in accuracy["sentence"]


def _clamp_sweep(folder: Path) -> None:
    """A stored clamp sweep (5 seeds): lambda 1 gains 0.1 over no correction on every seed, no clamp loses 0.1,
    lambda 3 (the first value, today's) moves a seed by at most 0.02 either way."""
    jitter = [0.01, -0.01, 0.0, 0.02, -0.02]
    effect = {"3.0": jitter, "1.0": [0.1 + j / 2 for j in jitter], sweeps.NO_VALUE: [-0.1 + j / 2 for j in jitter]}
    rows = []
    for clamp, gains in effect.items():
        for seed, gain in enumerate(gains):
            base = {"seed": seed, "correction.clamp": clamp, "items": 100, "correct": 0}
            accuracies = {"zero_shot": 0.0, "emulator_lora": 0.7, "transfer_uncorrected": 0.4 + 0.02 * seed,
                          "transfer_corrected": 0.4 + 0.02 * seed + gain}
            rows += [base | {"variant": v, "accuracy": a, "loss": 1.0 - a} for v, a in accuracies.items()]
    tables = {"items": pd.DataFrame({"item": [0]}),
              **sweep_tables.all_tables(pd.DataFrame(rows), ["correction.clamp"])}
    sweeps.write_table_files(tables, ["correction.clamp"], folder)


def test_clamp_table_and_findings_read_each_lambda_against_none_and_today(tmp_path):
    _clamp_sweep(tmp_path)
    table = schedule_tables.clamp_table(schedule_tables.clamp_tidy(tmp_path)).set_index("clamp lambda")
    assert list(table.index) == ["3", "1", "none"] and (table["seeds"] == 5).all()
    assert table.loc["1", "corrected - uncorrected"].endswith("beats")
    assert table.loc["none", "corrected - uncorrected"].endswith("worse")
    assert table.loc["3", "corrected - uncorrected"].endswith("within noise")
    assert table.loc["1", "minus lambda 3"].endswith("beats") and table.loc["3", "minus lambda 3"] == ""
    against_none, against_today = schedule_tables.clamp_findings(schedule_tables.clamp_tidy(tmp_path))
    assert against_none == ("corrected transfer: lambda 3 is within noise of no correction; lambda 1 beats no "
                            "correction; no clamp is worse than no correction")
    assert against_today == ("corrected transfer: lambda 1 beats lambda 3 (today); no clamp is worse than "
                             "lambda 3 (today)")
    tidy = schedule_tables.clamp_tidy(tmp_path).set_index("clamp_lambda")
    assert tidy.loc["1", "minus_uncorrected_verdict"] == "beats" and tidy.loc["1", "minus_uncorrected_low"] > 0
    assert tidy.loc["none", "minus_reference_high"] < 0 and math.isnan(tidy.loc["3", "minus_reference"])
    assert (tidy["reference_lambda"] == "3").all()


@pytest.mark.parametrize("axis, settings, value, label", [
    ("emulator.ratio", {"emulator": {"ratio": 0.75}}, 0.75, "minus ratio 0.5"),
    ("data.n_calibration", {"data": {"n_calibration": 256}}, 256, "minus calibration samples 64")])
def test_ratios_and_calibration_sizes_are_compared_with_the_default_at_100_steps(tmp_path, monkeypatch, axis,
                                                                                settings, value, label):
    monkeypatch.setattr(schedule_tables, "RESULTS", tmp_path)
    _stored_sweep(tmp_path / "long", 300, 0.0, "lora.steps")
    _stored_sweep(tmp_path / "short", 100, -0.4, None)
    _stored_sweep(tmp_path / "other", 100, -0.3, None)   # the other value: 0.1 above the default on every seed
    provenance.write(tmp_path / "other", provenance.record(
        {"p": {"preset": "standard", "lora": {"steps": 100}, **settings}}))
    seeds = schedule_tables.combined_seeds(["long", "short", "other"])
    axes = list(schedule_tables.AXES)[1:]
    rows = seeds.drop(columns="task")
    tables = sweep_tables.all_tables(rows, axes)
    tables["axes"] = pd.concat([tables["axes"], *(schedule_tables.axis_at_steps(rows, axes, a)
                                                  for a in schedule_tables.AXIS_LABELS)], ignore_index=True)
    compared = tables["axes"][(tables["axes"]["axis"] == axis) & (tables["axes"]["metric"] == "accuracy")
                              & (tables["axes"]["variant"] == "transfer_corrected")]
    assert len(compared) == 1   # only the axis that differs is compared
    other = compared.iloc[0]
    assert other["value"] == value and other["lora.steps"] == 100 and other["verdict"] == "beats"
    assert other["difference"] == pytest.approx(0.1) and other["sentence"].startswith("at lora.steps=100: ")
    table = schedule_tables.values_table(tables, axes, axis).set_index(axis)
    default = f"{schedule_tables.REFERENCE[axis]:g}"
    assert list(table.index) == [default, f"{value:g}"] and table.loc[default, label] == ""
    assert table.loc[f"{value:g}", label].startswith("0.100 [0.100, 0.100] beats")


def test_stored_fidelity_default_points_reproduce_the_headline_sweep():
    """The fidelity grid's trained ``default`` points are the headline sweep's EMLoC runs again (checkpointing
    off: the same gradients): the same accuracy per seed and variant, losses to float32 noise."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    points = pd.read_csv(results / "emulator_fidelity" / "points.csv")
    points = points[(points["setting"] == "default") & points["trained"] & (points["task"] == "addition")]
    sweep = pd.read_csv(results / "sweep_addition_5seeds" / "seeds.csv")
    sweep = sweep[sweep["emulator.method"] == "activation_aware"].set_index(["seed", "variant"])
    assert len(points) == 5
    for _, row in points.iterrows():
        for variant in ("zero_shot", "emulator", "emulator_lora", "transfer_uncorrected", "transfer_corrected"):
            stored = sweep.loc[(row["seed"], variant)]
            assert row[f"{variant}_accuracy"] == stored["accuracy"], (row["seed"], variant)
            assert row[f"{variant}_loss"] == pytest.approx(stored["loss"], abs=1e-5), (row["seed"], variant)


# ---- the correction's diagnostics ----------------------------------------------------------------------

def _report(coefficients: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"update_mismatch_coefficient": coefficients,
                         "update_mismatch_cosine": [10 * c for c in coefficients]})


def test_correction_diagnostics_read_one_adapter_per_seed_and_count_compensating_modules(tmp_path, monkeypatch):
    monkeypatch.setattr(correction_diagnostics, "CLAMP_SOURCES", {("addition", 100): "clamp"})
    (tmp_path / "clamp").mkdir()
    io.write_yaml(tmp_path / "clamp" / "grid.yaml", {})
    for seed, clamp, coefficients in [(0, "3.0", [0.0, 0.2, 0.1]), (0, "None", [9.0, 9.0, 9.0]),
                                      (1, "3.0", [0.0, 0.0, 0.05])]:
        point = tmp_path / "clamp" / "points" / f"seed={seed},clamp={clamp}"
        (point / "correction").mkdir(parents=True)
        io.write_yaml(point / "config.yaml", {"seed": seed})
        _report(coefficients).to_csv(point / "correction" / "report.csv", index=False)
    runs = correction_diagnostics.collect(tmp_path).set_index("seed")
    assert list(runs.index) == [0, 1]   # seed 0 read once (its first lambda point), the other lambda skipped
    assert runs.loc[0, "c_mean"] == pytest.approx(0.1) and runs.loc[0, "c_max"] == pytest.approx(0.2)
    assert runs.loc[0, "modules_compensating"] == 2 and runs.loc[1, "modules_compensating"] == 0
    assert runs.loc[0, "cosine_mean"] == pytest.approx(1.0)
    row = correction_diagnostics.summary(runs.reset_index()).iloc[0]
    mean, low, high = seed_interval([0.1, 0.05 / 3])
    assert row["seeds"] == 2 and row["c (module mean)"] == f"{mean:.1e} [{low:.1e}, {high:.1e}]"
    assert row["largest module c"] == "2.0e-01" and row["modules with c >= 0.1"] == "2 of 3"
