"""Sweeps on a tiny model (stage sharing, resume, tables) and the bootstrap intervals."""
import os

import numpy as np
import pytest

from conftest import tiny_run_config
from emloc import cli, pipeline, sweeps
from emloc.statistics import bootstrap_ci, bootstrap_means, gap_closed
from emloc.errors import EmlocError


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_items():
    rng = np.random.default_rng(0)
    small = [rng.binomial(1, 0.6, (1, 30)) for _ in range(3)]
    large = [rng.binomial(1, 0.6, (1, 600)) for _ in range(3)]
    mean, low, high = bootstrap_ci(small, n_boot=500)
    assert low <= mean <= high and 0 < low and high < 1
    _, low_l, high_l = bootstrap_ci(large, n_boot=500)
    assert high_l - low_l < (high - low) / 2
    assert bootstrap_ci(small, n_boot=500) == (mean, low, high)  # seeded: reproducible


def test_bootstrap_degenerate_and_seed_level_spread():
    assert bootstrap_ci([np.ones((1, 20))], n_boot=200) == (1.0, 1.0, 1.0)
    # two seeds that disagree completely: resampling seeds must widen the interval to both ends
    _, low, high = bootstrap_ci([np.zeros((1, 50)), np.ones((1, 50))], n_boot=400)
    assert low == 0.0 and high == 1.0
    assert bootstrap_means([np.ones((2, 5))], n_boot=7).shape == (7, 2)


def test_shared_items_keep_the_item_spread_that_the_nested_design_averages_away():
    row = (np.random.default_rng(1).random((1, 100)) < 0.5).astype(float)
    same_items = [row.copy() for _ in range(3)]  # three seeds that agree on every shared test item
    alone = bootstrap_ci([row], n_boot=500)
    assert bootstrap_ci(same_items, n_boot=500, shared_items=True) == alone
    _, low, high = bootstrap_ci(same_items, n_boot=500)
    assert high - low < (alone[2] - alone[1]) * 0.8
    with pytest.raises(ValueError, match="same number of items"):
        bootstrap_ci([np.ones((1, 5)), np.ones((1, 6))], shared_items=True)


def test_gap_closed_is_paired_and_matches_hand_computation():
    accuracy, zero, full = np.array([1, 1, 0, 1]), np.zeros(4), np.ones(4)
    share, low, high = bootstrap_ci([np.stack([accuracy, zero, full])], gap_closed, n_boot=300)
    assert share == pytest.approx(0.75) and low <= 0.75 <= high
    assert np.isnan(gap_closed(np.array([0.5, 0.2, 0.2])))


def test_grid_expansion_and_bad_specs():
    points = sweeps.expand_grid({"emulator.ratio": [0.25, 0.5], "seed": [0, 1]})
    assert points[0] == {"seed": 0, "emulator.ratio": 0.25} and len(points) == 4
    with pytest.raises(EmlocError, match="emulator.ratio"):
        sweeps.spec_from_dict({"grid": {"emulator.ratio": [1.5]}})
    with pytest.raises(EmlocError, match="variant"):
        sweeps.spec_from_dict({"grid": {"seed": [0]}, "variants": ["best"]})
    with pytest.raises(EmlocError, match="unknown key"):
        sweeps.spec_from_dict({"grids": {}})


def test_sweep_shares_stages_resumes_and_writes_tables(tiny_model_dir, tmp_path, capsys):
    base = tiny_run_config(tiny_model_dir).to_dict()
    grid = tmp_path / "grid.yaml"
    sweeps.io.write_yaml(grid, {"base": base, "grid": {"emulator.method": ["activation_aware", "plain"], "seed": [0, 1]},
                                "n_boot": 200})
    out, tables = tmp_path / "sweep", tmp_path / "tables"
    assert cli.main(["sweep", "--grid", str(grid), "--out", str(out), "--tables", str(tables)]) == 0
    points = sorted((out / "points").iterdir())
    assert len(points) == 4
    # LoRA on the original model is trained once per seed and hard-linked into the other method's point
    same_seed = [p for p in points if "seed=0" in p.name]
    inodes = {os.stat(p / "adapters" / "full_lora" / "adapter_model.safetensors").st_ino for p in same_seed}
    assert len(inodes) == 1
    summary = sweeps.pd.read_csv(tables / "summary.csv")
    assert len(summary) == 2 * 6 and (summary["seeds"] == 2).all() and (summary["items"] == 12).all()
    assert summary["interval"].eq("t").all()
    assert ((summary["ci_low"] <= summary["accuracy"] + 1e-12) & (summary["accuracy"] <= summary["ci_high"] + 1e-12)).all()
    zero = summary[summary["variant"] == "zero_shot"]["accuracy"]
    assert zero.nunique() == 1  # the same zero-shot items for both methods
    assert (tables / "summary.md").read_text().startswith("|") and (tables / "summary_figure.json").exists()
    timing = sweeps.pd.read_csv(tables / "timing.csv").set_index("point")  # what the sweep cost, per point
    assert sorted(timing.index) == [p.name for p in points] and (timing["total"] > 0).all()
    assert {"build", "train_emulator", "evaluate"} <= set(timing.columns)
    measured = sweeps.provenance.read(tables)
    measured["date"] = "2000-01-01T00:00:00+00:00"  # as if measured long ago
    sweeps.provenance.write(tables, measured)
    assert cli.main(["sweep", "--grid", str(grid), "--out", str(out), "--tables", str(tables),
                     "--tables-only"]) == 0
    recomputed = sweeps.provenance.read(tables)  # tables only: where the points were measured is kept
    assert recomputed["date"] == measured["date"] and recomputed["commit"] == measured["commit"]
    assert recomputed["tables_recomputed"]["date"] != measured["date"]
    assert set(sweeps.pd.read_csv(tables / "gap.csv")["variant"]) == set(sweeps.GAP_VARIANTS)
    wide = (tables / "wide.md").read_text()
    assert wide.split("\n\n")[0].count("\n") == 2 + 1 and "transfer_corrected" in wide  # header, rule, a row per method
    effect = sweeps.pd.read_csv(tables / "correction.csv").set_index("emulator.method")
    by_method = summary.set_index(["emulator.method", "variant"])["accuracy"]
    for method in ["activation_aware", "plain"]:
        expected = by_method[(method, "transfer_corrected")] - by_method[(method, "transfer_uncorrected")]
        assert effect.loc[method, "corrected_minus_uncorrected"] == pytest.approx(expected)
        assert effect.loc[method, "ci_low"] <= expected + 1e-12 <= effect.loc[method, "ci_high"] + 2e-12
        assert effect.loc[method, "verdict"] in {"beats", "worse", "within noise"}
    loss = sweeps.pd.read_csv(tables / "loss.csv").set_index(["emulator.method", "variant"])
    seeds = sweeps.pd.read_csv(tables / "seeds.csv")
    assert len(seeds) == 4 * 6 and seeds["loss"].notna().all()
    plain_zero = seeds[(seeds["emulator.method"] == "plain") & (seeds["variant"] == "zero_shot")]["loss"]
    assert loss.loc[("plain", "zero_shot"), "loss"] == pytest.approx(plain_zero.mean())
    assert loss.loc[("plain", "zero_shot"), "loss_low"] <= plain_zero.mean() <= loss.loc[("plain", "zero_shot"), "loss_high"]
    baselines = sweeps.pd.read_csv(tables / "baselines.csv")
    assert set(baselines["method"]) == {"plain"} and set(baselines["metric"]) == {"accuracy", "loss"}
    assert baselines["sentence"].str.startswith("EMLoC (activation_aware)").all()
    # the stored folder's tables are recomputed from its own files
    record = sweeps.provenance.read(tables / "summary.csv")
    assert record["declares"] == "current defaults" and sweeps.provenance.stale_settings(record) == []
    assert record["seeds"] == [0, 1] and set(record["configs"]) == {"method=activation_aware", "method=plain"}
    stored = {name: sweeps.pd.read_csv(tables / f"{name}.csv") for name in ("summary", "gap", "loss")}
    (tables / "summary.csv").unlink()
    sweeps.rewrite_tables(tables)
    for name, table in stored.items():
        sweeps.pd.testing.assert_frame_equal(sweeps.pd.read_csv(tables / f"{name}.csv"), table)
    # a second sweep resumes: no stage is redone
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("manifests/*.json")}
    assert cli.main(["sweep", "--grid", str(grid), "--out", str(out), "--tables", str(tables)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("manifests/*.json")}
    assert "sweep finished" in capsys.readouterr().out


def test_sub_grids_fill_missing_axes_from_base_and_drop_repeats():
    spec = sweeps.spec_from_dict({"base": {"emulator": {"ratio": 0.5}},
                                  "grid": [{"seed": [0], "emulator.method": ["activation_aware", "plain"]},
                                           {"seed": [0], "emulator.ratio": [0.5, 0.25]}]})
    assert spec.axes == ["emulator.method", "emulator.ratio"]
    names = [sweeps.point_name(p) for p in spec.points()]
    # the second sub-grid's ratio-0.5 point is the first sub-grid's activation_aware point
    assert names == ["seed=0,method=activation_aware,ratio=0.5", "seed=0,method=plain,ratio=0.5",
                     "seed=0,method=activation_aware,ratio=0.25"]
    with pytest.raises(EmlocError, match="list of mappings"):
        sweeps.spec_from_dict({"grid": [["seed"]]})


def test_items_table_of_a_sweep_with_sub_grids_and_no_finished_point(tmp_path):
    sweeps.io.write_yaml(tmp_path / "grid.yaml", {"grid": [{"seed": [0], "emulator.ratio": [0.5]},
                                                           {"seed": [0], "emulator.method": ["plain"]}]})
    assert list(sweeps.items_table(tmp_path).columns) == ["seed", "emulator.ratio", "emulator.method",
                                                          "variant", "item", "correct"]


def test_calibration_size_points_share_the_original_lora_and_reuse_adopts_a_finished_run(tiny_model_dir, tmp_path):
    base = tiny_run_config(tiny_model_dir).to_dict()
    finished = tmp_path / "finished"
    assert cli.main(["run", "--config", str(_write_config(tmp_path, base)), "--out", str(finished)]) == 0
    grid = tmp_path / "grid.yaml"
    sweeps.io.write_yaml(grid, {"base": base, "grid": [{"seed": [0], "data.n_calibration": [8, 4]}], "n_boot": 100,
                                "variants": ["zero_shot", "transfer_corrected", "full_lora"]})
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--grid", str(grid), "--out", str(out), "--reuse", str(finished)]) == 0
    same, other = out / "points" / "seed=0,n_calibration=8", out / "points" / "seed=0,n_calibration=4"
    inode = lambda run, rel: os.stat(run / rel).st_ino
    # the point equal to the finished run adopts all its stages; the other calibration size only LoRA on the original
    for rel in ["emulator/factors.safetensors", "adapters/emulator_lora/adapter_model.safetensors"]:
        assert inode(same, rel) == inode(finished, rel) != inode(other, rel)
    full = "adapters/full_lora/adapter_model.safetensors"
    assert inode(same, full) == inode(other, full) == inode(finished, full)
    assert cli.main(["sweep", "--grid", str(grid), "--out", str(out), "--reuse", str(tmp_path / "nowhere")]) == 2


def _write_config(tmp_path, config: dict):
    path = tmp_path / "config.yaml"
    sweeps.io.write_yaml(path, config)
    return path


def test_a_grid_asking_for_another_confidence_is_refused():
    with pytest.raises(sweeps.EmlocError, match="intervals are 95%"):
        sweeps.spec_from_dict({"grid": {"seed": [0]}, "confidence": 0.9})
    assert sweeps.spec_from_dict({"grid": {"seed": [0]}, "confidence": 0.95, "n_boot": 10}).confidence == 0.95


def test_points_sharing_the_emulators_adapter_take_each_variant_from_its_own_record(tiny_model_dir, tmp_path):
    """Two correction methods on the same adapters: the second point reuses the first's evaluations, each
    variant its own (``emulator_lora`` and ``transfer_uncorrected`` hang on the same stage, but differ)."""
    base = tiny_run_config(tiny_model_dir).to_dict()
    spec = sweeps.spec_from_dict({"base": base, "grid": {"seed": [0], "correction.method": ["official", "aligned"]}})
    out = tmp_path / "sweep"
    sweeps.run_sweep(spec, out, progress=False)
    first, second = (sweeps.io.read_json(out / "points" / f"seed=0,method={method}" / "point.json")["variants"]
                     for method in ("official", "aligned"))
    assert first["emulator_lora"]["loss"] != first["transfer_uncorrected"]["loss"]
    for variant in ("emulator_lora", "transfer_uncorrected", "zero_shot", "full_lora"):
        assert second[variant] == first[variant], variant


def test_a_reused_sweep_point_lends_its_evaluations(tiny_model_dir, tmp_path, monkeypatch):
    """A second sweep reusing a first sweep's point (e.g. one split off to run beside it) evaluates only what
    differs: here the corrected transfer of another correction method."""
    base = tiny_run_config(tiny_model_dir).to_dict()
    first = tmp_path / "first"
    sweeps.run_sweep(sweeps.spec_from_dict({"base": base, "grid": {"seed": [0]}}), first, progress=False)
    evaluated_variants = []
    real_evaluate = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate",
                        lambda run, variants, **kw: evaluated_variants.extend(variants) or real_evaluate(
                            run, variants, **kw))
    spec = sweeps.spec_from_dict({"base": base, "grid": {"seed": [0], "correction.method": ["aligned"]}})
    sweeps.run_sweep(spec, tmp_path / "second", progress=False, reuse=[first / "points" / "seed=0"])
    assert evaluated_variants == ["transfer_corrected"]
    lent = sweeps.io.read_json(first / "points" / "seed=0" / "point.json")["variants"]
    taken = sweeps.io.read_json(tmp_path / "second" / "points" / "seed=0,method=aligned" / "point.json")["variants"]
    assert all(taken[v] == lent[v] for v in ("zero_shot", "emulator_lora", "transfer_uncorrected", "full_lora"))


def test_a_null_axis_value_keeps_its_rows_in_every_table(tmp_path):
    """``correction.clamp: null`` (no clamp) reads "none": pandas would drop a missing value from a group
    (the summary lost the unclamped point) and CSV would bring it back as NaN."""
    out = tmp_path / "sweep"
    sweeps.io.write_yaml(out / "grid.yaml", {"base": {"preset": "quick"},
                                             "grid": {"seed": [0, 1], "correction.clamp": [3.0, None]}})
    spec = sweeps.load_spec(out / "grid.yaml")
    for point in spec.points():
        record = {v: {"key": "k", "accuracy": 0.5, "loss": 1.0, "n": 2, "correct": [1, 0]}
                  for v in sweeps.VARIANT_STAGE}
        sweeps.io.write_json(out / "points" / sweeps.point_name(point) / "point.json", {"variants": record})
    seeds = sweeps.seeds_table(out)
    assert set(seeds["correction.clamp"]) == {3.0, "none"}
    tables = sweeps.sweep_tables.all_tables(seeds, spec.axes)
    assert set(tables["summary"]["correction.clamp"]) == {3.0, "none"}
    assert "none" in set(tables["axes"]["value"]) and len(tables["correction"]) == 2
