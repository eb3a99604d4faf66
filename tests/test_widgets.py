"""Headless widget tests: build each view from a real (tiny) run, move its controls, check the figure data."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")

import shutil

import numpy as np
import pytest

import widgets
from emloc import pipeline
from emloc.config import RunConfig, merge_dicts
from emloc.errors import EmlocError
from emloc.models import load_tokenizer, tiny_llama
from emloc.reports import variant_summary
from widgets.results import GAP_SHOWN

TINY = {
    "device": "cpu",
    "data": {"n_train": 32, "n_calibration": 8, "n_test": 6, "max_length": 96},
    "lora": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "learning_rate": 5e-3},
    "evaluation": {"max_new_tokens": 3, "batch_size": 8},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished pipeline on a tiny random Llama (2 layers, hidden 64) saved as a model folder."""
    model_dir = tmp_path_factory.mktemp("tiny-llama-widgets")
    tiny_llama(seed=0).save_pretrained(model_dir)
    load_tokenizer("default").save_pretrained(model_dir)
    config = RunConfig.from_dict(merge_dicts(TINY, {"model": str(model_dir)}))
    run = pipeline.Run(tmp_path_factory.mktemp("run"), config, progress=False)
    losses = []
    pipeline.run_pipeline(run, on_loss=lambda which, step, loss: losses.append((which, step, loss)))
    run.streamed_losses = losses
    return run


def shown(view):
    """The plotly JSON currently in the view's Output (what the frontend draws)."""
    (output,) = view.output.outputs
    return output["data"]["application/vnd.plotly.v1+json"]


def ydata(trace):
    return np.asarray(trace.y, dtype=float)


def test_spectrum_explorer_rank_and_module(tiny_run):
    factors = tiny_run.factors()
    view = widgets.spectrum_explorer(factors)
    row = factors.report.iloc[0]
    assert view.module == row.module and view.rank_slider.value == row["rank"]
    assert view.trace("ratio rank").x[0] == row["rank"]
    sigma = factors.spectra[row.module]["whitened"].double().numpy()
    np.testing.assert_allclose(ydata(view.trace("sigma whitened")), sigma / sigma[0], rtol=1e-6)
    assert view.rank_slider.max == len(sigma)

    before_errors = ydata(view.trace("at rank"))
    view.rank_slider.value = 1
    after_errors = ydata(view.trace("at rank"))
    assert list(view.trace("at rank").x) == [1, 1]
    assert np.all(after_errors >= before_errors) and np.any(after_errors > before_errors)
    assert "<b>r = 1</b>" in view.stats.value
    view.rank_slider.value = view.rank_slider.max
    assert np.allclose(ydata(view.trace("at rank")), 0, atol=1e-6)   # full rank keeps everything
    assert "kept energy 100.0%" in view.stats.value

    first = ydata(view.trace("sigma plain")).copy()
    view.type_dropdown.value = "down_proj"
    assert view.module.endswith("layers.0.mlp.down_proj")
    assert not np.allclose(ydata(view.trace("sigma plain"))[:5], first[:5])
    view.layer_slider.value = 1          # layer 1's down_proj is left dense: the nearest compressed one is shown
    assert view.module.endswith("layers.0.mlp.down_proj")
    assert shown(view)["layout"]["title"]["text"].endswith("(W: 64 x 128)")


def test_error_map_ratio_slider(tiny_run):
    factors = tiny_run.factors()
    view = widgets.error_map(factors)
    z = np.asarray(view.trace("error").z, dtype=float)
    assert z.shape == (2, 7) and list(view.trace("error").y) == [0, 1]
    # at the configured ratio the map equals the build report's whitened error at rank
    report = factors.report.set_index("module")
    cell = report.loc["model.layers.1.self_attn.v_proj"]
    column = list(view.trace("error").x).index("v_proj")
    assert z[1, column] == pytest.approx(cell["whitened_error_at_rank"], rel=1e-6)
    assert z[1, column] == pytest.approx(cell["calibration_error"], rel=1e-3)
    saved_before = ydata(view.trace("saved")) if view.trace("saved").y is None else np.asarray(view.trace("saved").x)

    view.ratio_slider.value = 0.2
    z_low = np.asarray(view.trace("error").z, dtype=float)
    dense = np.isnan(z)                   # the last down_proj is left dense: no cell
    assert dense.sum() == 1 and np.all(z_low[~dense] >= z[~dense] - 1e-12) and np.any(z_low > z)
    assert np.all(np.asarray(view.trace("saved").x) > saved_before)
    assert "ρ = 0.20" in view.stats.value

    view.kind_dropdown.value = "plain"
    z_plain = np.asarray(view.trace("error").z, dtype=float)
    assert not np.allclose(z_plain, z_low)
    assert "weight error" in shown(view)["layout"]["title"]["text"]


def test_training_monitor_live_and_history(tiny_run, tmp_path):
    monitor = widgets.training_monitor(total_steps=3)
    assert list(monitor.trace("emulator").x) == []
    for which, step, loss in tiny_run.streamed_losses:
        monitor.on_loss(which, step, loss)
    emulator = tiny_run.history("emulator")["history"]
    assert list(monitor.trace("emulator").x) == [s for s, _ in emulator]
    np.testing.assert_allclose(ydata(monitor.trace("emulator")), [l for _, l in emulator])
    assert monitor.progress["emulator"].value == 3 and monitor.progress["original"].value == 3

    finished = widgets.training_monitor({w: tiny_run.history(w) for w in ("emulator", "original")})
    np.testing.assert_allclose(ydata(finished.trace("original")), [l for _, l in tiny_run.history("original")["history"]])
    assert finished.progress["original"].bar_style == "success"
    assert "final loss" in finished.stats["emulator"].value

    live = widgets.training_monitor(total_steps=3)
    retrained = pipeline.Run(shutil.copytree(tiny_run.dir, tmp_path / "copy"), tiny_run.config, progress=False)
    pipeline.train(retrained, "emulator", on_loss=live.callback("emulator"))  # a copy: the shared run stays evaluated
    assert len(live.trace("emulator").x) == 3 and len(shown(live)["data"][0]["x"]) > 0
    with pytest.raises(ValueError):
        live.on_loss("student", 1, 0.5)


def test_correction_inspector_lambda_slider(tiny_run):
    report, tensors = tiny_run.correction_report(), tiny_run.correction_tensors()
    view = widgets.correction_inspector(report, tensors, tiny_run.config.correction.clamp)
    before, after = ydata(view.trace("before")), ydata(view.trace("after"))
    np.testing.assert_allclose(after, report.groupby("layer")["misalignment_after"].mean().to_numpy(), atol=1e-12)

    learned = report.groupby("layer")["update_mismatch_coefficient"].mean().to_numpy()
    np.testing.assert_allclose(ydata(view.trace("coefficient")), learned, atol=1e-12)
    view.type_dropdown.value = "down_proj"          # the diagnostics follow the module-type menu
    np.testing.assert_allclose(ydata(view.trace("coefficient")),
                               report[report["type"] == "down_proj"]["update_mismatch_coefficient"].to_numpy(), atol=1e-12)
    view.type_dropdown.value = "all modules"

    view.no_clamp.value = True                       # no clamp: the correction removes all misalignment
    assert np.allclose(ydata(view.trace("after")), 0, atol=1e-9)
    assert np.allclose(ydata(view.trace("clamped")), 0)
    assert view.lambda_slider.disabled
    view.no_clamp.value = False
    view.lambda_slider.value = 0.1                   # a tight clamp leaves more misalignment
    tight = ydata(view.trace("after"))
    np.testing.assert_allclose(ydata(view.trace("before")), before)   # before does not depend on lambda
    assert np.all(tight >= after - 1e-12) and np.all(tight <= before + 1e-12)
    assert ydata(view.trace("clamped")).sum() > 0
    assert "λ = 0.1" in view.stats.value

    view.type_dropdown.value = "q_proj"
    q_rows = view.report().query("type == 'q_proj'")
    np.testing.assert_allclose(ydata(view.trace("after")), q_rows.groupby("layer")["misalignment_after"].mean().to_numpy(), atol=1e-12)


def test_results_board_metric_and_seeds(tiny_run):
    results = tiny_run.results()
    board = widgets.results_board(results)
    variants = list(results["variants"])
    assert len(board.trace("variants").x) == len(variants) == len(pipeline.VARIANTS)
    np.testing.assert_allclose(ydata(board.trace("variants")), [results["variants"][v]["accuracy"] for v in variants])
    memory = ydata(board.trace("memory"))
    assert memory[1] < memory[0]       # the emulator is smaller
    board.metric.value = "loss"
    np.testing.assert_allclose(ydata(board.trace("variants")), [results["variants"][v]["loss"] for v in variants])
    assert "loss" in shown(board)["layout"]["title"]["text"]

    other = {**results, "variants": {v: {**r, "loss": r["loss"] + 0.5} for v, r in results["variants"].items()}}
    two = widgets.results_board([results, other])
    two.metric.value = "loss"
    np.testing.assert_allclose(ydata(two.trace("variants")), [results["variants"][v]["loss"] + 0.25 for v in variants])
    error = two.trace("variants").error_y
    assert np.all(np.asarray(error.array) > 0)
    assert variant_summary([results, other])["interval"].eq("t").all()


def test_results_board_with_rescored_items(tiny_run):
    """Per-item correctness re-scored from the saved predictions; several seeds get the sweeps' Student-t over
    seeds, one seed the Wilson interval from the counted items."""
    from emloc.data import make_task_data
    from emloc.evaluation import item_correctness
    results = tiny_run.results()
    correct = item_correctness(results, tiny_run.data)
    assert set(correct) == set(results["variants"])
    for variant, items in correct.items():
        assert len(items) == results["variants"][variant]["n"] and set(items) <= {0, 1}
        assert sum(items) / len(items) == results["variants"][variant]["accuracy"]
    board = widgets.results_board([results, results], correct=[correct, correct])
    assert board.summary["interval"].eq("t").all()
    assert "Student-t over seeds" in board.stats.value
    assert widgets.results_board(results, correct=correct).summary["interval"].eq("wilson").all()
    np.testing.assert_allclose(ydata(board.trace("variants")), [results["variants"][v]["accuracy"] for v in correct])
    low, high = board.summary["accuracy_low"], board.summary["accuracy_high"]
    assert ((low <= board.summary["accuracy"] + 1e-12) & (board.summary["accuracy"] <= high + 1e-12)).all()
    perfect = {v: [e.response for e in tiny_run.data.test] for v in results["variants"]}
    wrong_scores = {**results, "predictions": perfect,
                    "variants": {v: {**r, "accuracy": 0.0} for v, r in results["variants"].items()}}
    assert all(sum(c) == len(c) for c in item_correctness({**wrong_scores, "variants": {
        v: {**r, "accuracy": 1.0} for v, r in results["variants"].items()}}, tiny_run.data).values())
    with pytest.raises(EmlocError, match="run.data"):          # re-scoring disagrees with the saved accuracy
        item_correctness(wrong_scores, tiny_run.data)
    other = make_task_data("addition", 32, 8, 7, seed=99)           # another split: 7 test items, not 6
    with pytest.raises(EmlocError, match="run.data"):
        item_correctness(results, other)


def test_variant_summary_loss_gap_closed():
    """(L_zero - L) / (L_zero - L_full): 0 at zero-shot, 1 at full LoRA, NaN when there is no gap to close."""
    def results(losses):
        return {"variants": {v: {"accuracy": 0.0, "loss": loss, "n": 10} for v, loss in losses.items()}}

    summary = variant_summary(results({"zero_shot": 3.0, "emulator": 3.5, "emulator_lora": 1.2, "full_lora": 1.0}))
    gap = summary["loss_gap_closed"]
    assert gap["zero_shot"] == 0.0 and gap["full_lora"] == 1.0
    assert gap["emulator_lora"] == pytest.approx(0.9) and gap["emulator"] == pytest.approx(-0.25)
    two_seeds = variant_summary([results({"zero_shot": 3.0, "emulator_lora": 2.0, "full_lora": 1.0}),
                                 results({"zero_shot": 3.0, "emulator_lora": 1.0, "full_lora": 1.0})])
    assert two_seeds.loc["emulator_lora", "loss_gap_closed"] == pytest.approx(0.75)   # on the mean losses
    for undefined in ({"zero_shot": 3.0, "emulator_lora": 2.0},                        # no full LoRA
                      {"zero_shot": 1.0, "emulator_lora": 2.0, "full_lora": 1.0},      # no gap
                      {"zero_shot": 1.0, "emulator_lora": 2.0, "full_lora": 1.5}):     # full LoRA worse
        assert variant_summary(results(undefined))["loss_gap_closed"].isna().all()


def test_results_board_shows_the_loss_gap_closed(tiny_run):
    results = tiny_run.results()
    board = widgets.results_board(results)
    variants = list(results["variants"])
    loss = {v: results["variants"][v]["loss"] for v in variants}
    gap = board.trace("gap")
    assert list(gap.x) == list(board.trace("variants").x) and gap.visible is not False
    expected = [(loss["zero_shot"] - loss[v]) / (loss["zero_shot"] - loss["full_lora"]) for v in variants]
    if loss["full_lora"] < loss["zero_shot"]:
        np.testing.assert_allclose(np.asarray(gap.customdata, dtype=float), expected)      # the true shares
        np.testing.assert_allclose(ydata(gap), np.clip(expected, *GAP_SHOWN))              # the bars, within bounds
        assert ydata(gap)[variants.index("zero_shot")] == 0 and ydata(gap)[variants.index("full_lora")] == 1
    shown_gap = next(t for t in shown(board)["data"] if t.get("meta") == "gap")
    assert len(shown_gap["text"]) == len(variants)
    low, high = shown(board)["layout"]["yaxis"]["range"]
    finite = ydata(gap)[np.isfinite(ydata(gap))]
    assert low <= min(0, *finite) and high >= max(1, *finite)       # no drawn bar is cut off


def test_results_board_keeps_a_far_off_variant_readable():
    """An emulator without LoRA far worse than zero-shot is drawn at the axis floor, labelled with its true share."""
    losses = {"zero_shot": 3.0, "emulator": 9.0, "emulator_lora": 1.2, "full_lora": 1.0}
    results = {"variants": {v: {"accuracy": 0.0, "loss": loss, "n": 10} for v, loss in losses.items()},
               "parameters": {"original": 1000, "emulator": 600}, "config": {}}
    board = widgets.results_board(results)
    gap = board.trace("gap")
    assert gap.customdata[1] == pytest.approx(-3.0) and ydata(gap)[1] == GAP_SHOWN[0]
    assert gap.text[1].startswith("-300%") and gap.text[2] == "90%"
    low, high = board.figure.layout.yaxis.range
    assert GAP_SHOWN[0] - 0.5 < low <= GAP_SHOWN[0] and 1 <= high < 1.5     # the other bars keep their height
    assert "loss gap closed" in board.trace("variants").hovertext[0]
    board.metric.value = "loss"                                      # a share does not belong on a loss axis
    assert board.trace("gap").visible is False and shown(board)["layout"]["yaxis"].get("range") is None
    board.metric.value = "accuracy"
    assert board.trace("gap").visible is True


def test_views_group_a_gpt2_emulator_by_its_module_types():
    """GPT-2's two c_proj per block are two columns (attn.c_proj, mlp.c_proj), in the error map and the
    spectrum explorer alike."""
    import torch

    from emloc.calibration import collect_statistics
    from emloc.config import EmulatorConfig
    from emloc.models import tiny_causal_lm
    from emloc.svd_emulator import build_factors

    model = tiny_causal_lm("gpt2")
    features = [{"input_ids": torch.randint(3, 1000, (12,)).tolist()} for _ in range(4)]
    stats = collect_statistics(model, features, ["auto"], pad_token_id=2, progress=False)
    factors = build_factors(model, stats, EmulatorConfig(ratio=0.5), progress=False)
    error_map = widgets.error_map(factors)
    types = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert list(error_map.trace("error").x) == types
    z = np.asarray(error_map.trace("error").z, dtype=float)
    assert z.shape == (2, 4) and np.isnan(z[1, 3]) and np.isfinite(np.delete(z.ravel(), 7)).all()
    explorer = widgets.spectrum_explorer(factors)
    assert list(explorer.type_dropdown.options) == types
    explorer.type_dropdown.value = "attn.c_proj"
    assert explorer.module == "transformer.h.0.attn.c_proj"
