"""The inspection tables behind the widgets (emloc.reports) and the shared notebook run (emloc.notebook)."""
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from emloc.errors import EmlocError
from emloc.lowrank import calibration_error, rank_from_ratio, whitened_truncation
from emloc.notebook import ensure, notebook_run, notebook_run_dir
from emloc.statistics import wilson_interval
from emloc.reports import (error_curves, errors_at_ratio, layer_grid, memory_table, misalignment_by_layer, rank_summary,
                           spectrum_curves, variant_summary)


def test_spectrum_curves_ends_and_monotone():
    sigma = torch.tensor([4.0, 2.0, 1.0, 0.5])
    curves = spectrum_curves(sigma)
    assert curves["normalised"][0] == 1 and len(curves["error"]) == 5
    assert curves["error"][0] == pytest.approx(1) and curves["error"][-1] == 0
    assert np.all(np.diff(curves["kept_energy"]) >= 0)
    assert curves["kept_energy"][1] == pytest.approx(16 / 21.25)
    summary = rank_summary(curves, 2, out_features=6, in_features=3)
    assert summary["kept_energy"] == pytest.approx(20 / 21.25)
    assert summary["ratio"] == pytest.approx(2 / 2.0) and summary["parameter_share"] == pytest.approx(1.0)
    assert rank_summary(curves, 99, 6, 3)["rank"] == 4


def test_whitened_curve_is_the_calibration_error_of_the_truncation():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(12, 20, generator=generator, dtype=torch.float64)
    X = torch.randn(20, 50, generator=generator, dtype=torch.float64)
    C = X @ X.T
    u, v, sigma = whitened_truncation(W, C, 5)
    curve = error_curves({"m": {"whitened": sigma, "plain": torch.linalg.svdvals(W)}})["m"]
    assert curve[5] == pytest.approx(calibration_error(W, u @ v, C), rel=1e-9)


def fake_build_report():
    rows = []
    for layer in range(3):
        for kind, (out_f, in_f) in {"q_proj": (8, 8), "down_proj": (8, 16)}.items():
            rows.append({"module": f"model.layers.{layer}.{kind}", "layer": layer, "type": kind,
                         "out_features": out_f, "in_features": in_f, "params_before": out_f * in_f})
    return pd.DataFrame(rows)


def test_errors_at_ratio_ranks_params_and_grid():
    report = fake_build_report()
    sigmas = {m: {"whitened": torch.linspace(3, 1, 8) * (i + 1), "plain": torch.ones(8)} for i, m in enumerate(report["module"])}
    curves = error_curves(sigmas)
    half, low = errors_at_ratio(report, curves, 0.5), errors_at_ratio(report, curves, 0.2)
    assert list(half["rank"]) == [rank_from_ratio(0.5, o, i) for o, i in zip(report["out_features"], report["in_features"])]
    assert list(half["params_after"]) == list(half["rank"] * (report["out_features"] + report["in_features"]))
    assert np.all(low["error"] >= half["error"]) and np.all(low["params_saved"] > half["params_saved"])
    assert half.loc[0, "error"] == pytest.approx(curves[report.loc[0, "module"]][half.loc[0, "rank"]])
    grid = layer_grid(half, "error")
    assert grid.shape == (3, 2) and list(grid.columns) == ["q_proj", "down_proj"]
    with pytest.raises(ValueError):
        error_curves(sigmas, "bogus")


def test_misalignment_by_layer():
    report = pd.DataFrame({"module": list("abcd"), "layer": [0, 0, 1, 1], "type": ["q", "k", "q", "k"],
                           "misalignment_before": [0.2, 0.4, 0.1, 0.3], "misalignment_after": [0.0, 0.2, 0.0, 0.0],
                           "clamped_columns": [0, 4, 0, 0], "columns": [8, 8, 8, 8]})
    table = misalignment_by_layer(report)
    assert table.loc[0, "misalignment_before"] == pytest.approx(0.3)
    assert table.loc[0, "clamped_share"] == pytest.approx(0.25) and table.loc[0, "modules_clamped"] == 1
    assert misalignment_by_layer(report, "k").loc[1, "misalignment_before"] == pytest.approx(0.3)
    with pytest.raises(ValueError):
        misalignment_by_layer(report, "v")


def results(acc, loss, n=10):
    return {"variants": {"zero_shot": {"accuracy": 0.0, "loss": 3.0, "n": n},
                         "emulator_lora": {"accuracy": acc, "loss": loss, "n": n}},
            "parameters": {"original": 1000, "emulator": 600}, "config": {"dtype": "bfloat16"}}


def test_variant_summary_and_memory():
    one = variant_summary(results(0.5, 1.0))
    assert one.loc["emulator_lora", "interval"] == "wilson" and one.loc["emulator_lora", "accuracy_low"] < 0.5
    assert one.loc["emulator_lora", "loss_low"] == one.loc["emulator_lora", "loss_high"] == 1.0
    three = variant_summary([results(0.4, 1.0), results(0.5, 1.2), results(0.6, 1.4)])
    assert three.loc["emulator_lora", "accuracy"] == pytest.approx(0.5) and three.loc["emulator_lora", "seeds"] == 3
    assert three.loc["emulator_lora", "accuracy_high"] - 0.5 == pytest.approx(4.302653 * 0.1 / math.sqrt(3))
    assert three.loc["emulator_lora", "loss_interval"] == "t" and one.loc["emulator_lora", "loss_interval"] == "none"
    memory = memory_table(results(0.5, 1.0))
    assert memory.loc["emulator", "megabytes"] == pytest.approx(600 * 2 / 2**20)
    assert memory.loc["emulator", "share_of_original"] == pytest.approx(0.6)


def test_variant_summary_is_the_sweeps_seed_level_summary():
    """Several seeds: the board's accuracy interval is the sweeps' Student-t over seed means; one seed: Wilson
    over the test items counted from ``correct``."""
    from emloc.sweep_tables import seeds_from_items, summary_table
    rng = np.random.default_rng(0)
    correct = [{"zero_shot": [0] * 10, "emulator_lora": list(rng.integers(0, 2, 10))} for _ in range(3)]
    runs = [results(float(np.mean(c["emulator_lora"])), 1.0 + i) for i, c in enumerate(correct)]
    summary = variant_summary(runs, correct)
    items = pd.DataFrame([{"seed": seed, "variant": "emulator_lora", "item": i, "correct": c}
                          for seed, record in enumerate(correct) for i, c in enumerate(record["emulator_lora"])])
    sweep = summary_table(seeds_from_items(items), []).iloc[0]
    row = summary.loc["emulator_lora"]
    assert row["interval"] == "t" == sweep["interval"] and row["loss_interval"] == "t"
    assert (row["accuracy"], row["accuracy_low"], row["accuracy_high"]) == pytest.approx(
        (sweep["accuracy"], sweep["ci_low"], sweep["ci_high"]), abs=1e-12)
    assert row["accuracy"] == pytest.approx(np.mean([r["variants"]["emulator_lora"]["accuracy"] for r in runs]))
    assert summary.loc["zero_shot", "accuracy_high"] == 0.0      # never right: a point interval
    one = variant_summary(runs[0], correct[0]).loc["emulator_lora"]
    assert one["interval"] == "wilson" and (one["accuracy_low"], one["accuracy_high"]) == pytest.approx(
        wilson_interval(sum(correct[0]["emulator_lora"]), 10))
    with pytest.raises(ValueError, match="one per seed"):
        variant_summary(runs, correct[:2])


def test_loss_gap_closed_is_undefined_when_the_gap_is_doubtful():
    """With several seeds the loss gap closed carries its interval, and is undefined (NaN, with the reason)
    when the zero-shot -> full-LoRA gap's own interval reaches zero."""
    def run(zero, full, lora):
        return {"variants": {"zero_shot": {"accuracy": 0.0, "loss": zero, "n": 10},
                             "emulator_lora": {"accuracy": 0.0, "loss": lora, "n": 10},
                             "full_lora": {"accuracy": 0.0, "loss": full, "n": 10}}}
    clear = variant_summary([run(4.0, 1.0, 2.5), run(4.1, 1.1, 2.4), run(3.9, 0.9, 2.6)])
    row = clear.loc["emulator_lora"]
    assert row["loss_gap_closed"] == pytest.approx(0.5) and row["loss_gap_low"] < 0.5 < row["loss_gap_high"]
    doubtful = variant_summary([run(4.0, 3.9, 3.95), run(4.0, 4.1, 4.0), run(4.0, 3.95, 4.0)])
    assert np.isnan(doubtful.loc["emulator_lora", "loss_gap_closed"])
    assert "not above zero" in doubtful.loc["emulator_lora", "loss_gap_note"]


def test_notebook_run_directory_and_reuse(tmp_path, monkeypatch):
    from emloc.models import load_tokenizer, tiny_llama
    monkeypatch.setenv("EMLOC_NOTEBOOK_RUN", str(tmp_path / "shared"))
    assert notebook_run_dir() == tmp_path / "shared"
    model_dir = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(model_dir)
    load_tokenizer("default").save_pretrained(model_dir)
    run = notebook_run(model=str(model_dir), device="cpu", data={"n_calibration": 4, "max_length": 64})
    assert run.dir == tmp_path / "shared" and run.config.lora.steps == 15   # quick preset sizes
    run.progress = False
    assert ensure(run, "build") == ["calibrate", "build"]
    again = notebook_run(model=str(model_dir), device="cpu", data={"n_calibration": 4, "max_length": 64})
    assert ensure(again, "build") == []
    changed = notebook_run(model=str(model_dir), device="cpu", data={"n_calibration": 4, "max_length": 64},
                           emulator={"ratio": 0.3})
    changed.progress = False
    assert ensure(changed, "build") == ["build"]          # calibration does not depend on the ratio
    with pytest.raises(EmlocError):
        ensure(run, "bogus")
    with pytest.raises(EmlocError):
        notebook_run(preset="huge")


def _stage(name: str, peak: float, **extra) -> dict:
    return {"stage": name, "peak_rss_mb": peak, **extra}


def test_measured_memory_and_headline_ratios():
    from emloc.reports import measured_memory, memory_headline
    memory = {"stages": [_stage("inference_original", 1000.0), _stage("lora_original", 1100.0, s_per_step=2.0),
                         _stage("construction", 5000.0), _stage("lora_emulator", 850.0, s_per_step=1.0)],
              "variants": [_stage("lora_emulator_no_checkpointing", 1400.0)]}
    table = measured_memory(memory)
    assert "construction" not in " ".join(table.index)  # only the training and inference rows
    assert table.loc["LoRA on the emulator", "over_inference"] == pytest.approx(0.85)
    assert table.loc["LoRA on the emulator, no checkpointing", "over_inference"] == pytest.approx(1.4)
    big = {"parameters": 1.523e9, "dtype": "bfloat16",
           "stages": [_stage("big_build", 9000.0), _stage("big_inference_original", 6000.0, running_peak_mb=4000.0),
                      _stage("big_lora_emulator", 3000.0, running_peak_mb=3000.0)]}
    headline = memory_headline(memory, big)
    assert list(headline["model"].unique()) == ["default model, float32", "1.5B random Llama, bfloat16"]
    assert headline["over_inference"].tolist() == pytest.approx([1.0, 0.85, 1.0, 0.75])
    assert len(memory_headline(memory)) == 2
    big_float32 = {**big, "dtype": "float32"}
    both = memory_headline(memory, big_float32, big)
    assert both["model"].unique().tolist()[1:] == ["1.5B random Llama, float32", "1.5B random Llama, bfloat16"]
    assert len(both) == 6
