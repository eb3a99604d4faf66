"""The EMLoC stages on the digits denoiser through the same pipeline as a language model: ``emloc run --model
digits-dit-tiny`` (the task seam of emloc.model_tasks), its artifacts, and what stays unchanged for language
models."""
import json

import numpy as np
import pytest
import torch

from conftest import assert_reproduces_inside_subspace
from emloc import denoiser, model_tasks, pipeline, provenance
from emloc.calibration import target_linears
from emloc.cli import main
from emloc.config import RunConfig
from emloc.correction import lora_layers
from emloc.errors import EmlocError
from emloc.families import CONDITIONING
from emloc.lora import load_adapter
from emloc.rundir import fingerprint
from emloc.stages import STAGES

TINY_MODEL = "digits-dit-tiny"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """``emloc run --model digits-dit-tiny`` with the clamp off (so the correction is exact)."""
    out = tmp_path_factory.mktemp("dreambooth") / "run"
    assert main(["run", "--model", TINY_MODEL, "--out", str(out), "--clamp", "0"]) == 0
    return pipeline.Run(out, progress=False)


def test_emloc_run_on_the_tiny_denoiser_runs_every_stage(finished_run):
    run = finished_run
    assert isinstance(run.task, model_tasks.DreamBoothTask) and run.config.model == TINY_MODEL
    assert all(run.is_done(stage.name) for stage in STAGES)
    results = run.results()
    assert list(results["variants"]) == pipeline.VARIANTS
    for figures in results["variants"].values():
        assert set(figures) == {*model_tasks.DreamBoothTask.metrics, "n"}
        assert 0 <= figures["subject_fidelity"] <= 1 and 0 <= figures["prior_preservation"] <= 1
        assert figures["n"] == denoiser.N_CLASSES * run.config.dreambooth.samples_per_digit
    adapter = json.loads((run.adapter_dir("emulator") / "adapter_config.json").read_text())
    assert adapter["task_type"] is None and adapter["peft_type"] == "LORA"  # a standard peft folder
    fidelity = run.fidelity()
    assert fidelity["relative_error"] > 0 and len(fidelity["relative_error_by_timestep"]) >= 1


def test_the_calibration_saw_every_targeted_linear(finished_run):
    run = finished_run
    linears = target_linears(run.model, run.config.emulator.target_modules)
    stats = run.stats()
    assert set(stats.input_of) == set(linears) and all(count > 0 for count in stats.token_counts.values())
    assert all(not CONDITIONING.search(name) for name in linears)  # kept dense by default


def test_the_runs_corrected_adapter_reproduces_the_fine_tuned_emulator_in_its_subspace(finished_run):
    run = finished_run
    factors = run.factors()
    emulated = load_adapter(run.emulator(factors), run.adapter_dir("emulator"))
    corrected = load_adapter(run.fresh_model(), run.adapter_dir("corrected"))
    assert_reproduces_inside_subspace(lora_layers(emulated), lora_layers(corrected), factors.u)


def test_built_in_model_defaults_sit_beneath_what_the_user_sets():
    config = RunConfig.from_dict({"model": "digits-dit", "lora": {"steps": 7}})
    assert config.lora.steps == 7 and config.lora.batch_size == 16 and config.lora.warmup_steps == 0
    assert RunConfig.from_dict({}).lora.steps == RunConfig().lora.steps  # language models untouched


def test_conditioning_layers_are_compressed_only_when_asked(tmp_path):
    def targets(keep: bool) -> list[str]:
        config = RunConfig.from_dict({"model": TINY_MODEL, "dreambooth": {"keep_conditioning_dense": keep}})
        return pipeline.Run(tmp_path / str(keep), config, progress=False).config.emulator.target_modules

    kept, compressed = targets(True), targets(False)
    assert set(kept) < set(compressed)
    skeleton = denoiser.denoiser_skeleton(denoiser.DENOISER_PRESETS["tiny"])
    extra = target_linears(skeleton, sorted(set(compressed) - set(kept)))
    assert extra and all(CONDITIONING.search(name) for name in extra)


def test_noise_prediction_error_is_zero_for_the_same_model():
    model = denoiser.build_denoiser(denoiser.DENOISER_PRESETS["tiny"], seed=0).eval()
    data = denoiser.dreambooth_data(n_subject=3, n_prior=5, seed=0)
    same = denoiser.noise_prediction_error(model, model, data, denoiser.DENOISER_PRESETS["tiny"])
    assert same["relative_error"] == 0 and same["images"] == 4 * 8
    other = denoiser.build_denoiser(denoiser.DENOISER_PRESETS["tiny"], seed=1).eval()
    assert denoiser.noise_prediction_error(model, other, data, denoiser.DENOISER_PRESETS["tiny"])[
        "relative_error"] > 0.1


def test_a_language_models_fingerprints_and_records_leave_the_dreambooth_section_out():
    language, changed = RunConfig(), RunConfig.from_dict({"dreambooth": {"prior_images": 3}})
    for stage in STAGES:
        assert fingerprint(language, stage.name) == fingerprint(changed, stage.name)
    tiny, tiny_changed = (RunConfig.from_dict({"model": TINY_MODEL, "dreambooth": d})
                          for d in ({}, {"prior_images": 3}))
    assert fingerprint(tiny, "calibrate") != fingerprint(tiny_changed, "calibrate")
    record = provenance.record({"default": {}})
    del record["configs"]["default"]["resolved"]["dreambooth"]  # measured before the section existed
    assert provenance.stale_settings(record) == []


@pytest.mark.parametrize("argv, expected", [
    (["--memory-budget", "inference"], "--memory-budget plans causal language models only"),
    (["--method", "layer_drop"], "method 'layer_drop' is for causal language models"),
])
def test_what_only_a_language_model_has_is_refused_in_one_line(tmp_path, capsys, argv, expected):
    assert main(["run", "--model", TINY_MODEL, "--out", str(tmp_path / "r"), *argv]) != 0
    error = capsys.readouterr().err.strip()
    assert expected in error and "\n" not in error
    assert not (tmp_path / "r" / "manifests").exists()


def test_dreambooth_settings_are_checked_in_one_line():
    with pytest.raises(Exception) as error:
        RunConfig.from_dict({"model": TINY_MODEL, "dreambooth": {"prior_share": 1.0}})
    assert "dreambooth.prior_share" in str(error.value) and "\n" not in str(error.value)


def test_training_losses_reach_the_callback_as_they_come():
    preset = denoiser.DENOISER_PRESETS["tiny"]
    from emloc.config import LoraConfigSpec
    from emloc.lora import add_lora
    model = add_lora(denoiser.build_denoiser(preset, 0), LoraConfigSpec(r=2, alpha=4), ["auto"], seed=0)
    seen = []
    losses = denoiser.train_dreambooth(model, denoiser.dreambooth_data(2, 4), preset, steps=3, batch_size=4,
                                       progress=False, on_loss=lambda step, loss: seen.append((step, loss)))
    assert seen == list(enumerate(losses, start=1)) and all(torch.isfinite(torch.tensor(losses)))


def test_a_denoiser_run_keeps_samples_the_views_read(finished_run):
    results = finished_run.results()
    for variant, record in results["samples"].items():
        images = denoiser.stored_samples(record)
        assert images.shape == (denoiser.N_CLASSES, record["per_digit"], 8, 8)
        assert 0 <= images.min() and images.max() <= 1 and record["digits"] == list(range(denoiser.N_CLASSES))


def test_mosaic_places_every_tile_with_blank_gaps():
    tiles = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    picture = denoiser.mosaic(tiles, gap=1)
    assert picture.shape == (5, 8) and np.isnan(picture[2]).all() and np.isnan(picture[:, 2]).all()
    assert (picture[3:5, 6:8] == tiles[1, 2]).all()


def test_calibration_error_by_timestep_is_zero_at_full_rank_and_covers_every_range(finished_run):
    run = finished_run
    table = denoiser.calibration_error_by_timestep(run.model, run.factors(), run.data, run.task.preset, bins=2)
    assert set(table["module"]) == set(run.factors().u) and table["timesteps"].nunique() == 2
    assert (table["error"] > 0).all() and table["block"].ge(0).all()
    weights = {name: linear.weight.detach().clone()
               for name, linear in target_linears(run.model, list(run.factors().u)).items()}
    exact = type(run.factors())(  # every module at full rank: u = I, v = W, so W' = W
        {name: torch.eye(W.shape[0]) for name, W in weights.items()}, weights, {}, run.factors().report, "plain")
    assert denoiser.calibration_error_by_timestep(run.model, exact, run.data, run.task.preset, bins=2)[
        "error"].max() < 1e-6


def test_sample_gallery_moves_between_runs_and_samples(finished_run):
    import widgets
    results = finished_run.results()
    other = json.loads(json.dumps(results))
    other["samples"]["zero_shot"]["pixels"] = [[255] * 64 for _ in other["samples"]["zero_shot"]["pixels"]]
    view = widgets.sample_gallery({"this run": results, "another": other})
    grid = view.grid()
    assert grid.shape == (len(results["samples"]), denoiser.N_CLASSES, 8, 8)
    z = np.asarray(view.trace("samples").z, dtype=float)
    assert np.nanmax(z) <= 1 and np.isnan(z).any()  # gaps are blank
    view.run_dropdown.value = "another"
    assert (view.grid()[0] == 1).all() and not (grid[0] == 1).all()
    if view.sample_slider.max > 1:
        view.sample_slider.value = 2
        assert not np.array_equal(view.grid()[1:], grid[1:])
    assert "subject" in view.stats.value and "(subject)" in "".join(view.figure.layout.xaxis.ticktext)


def test_sample_gallery_refuses_a_run_without_samples():
    import widgets
    with pytest.raises(EmlocError):
        widgets.sample_gallery({"variants": {}})


def test_the_subject_share_exercise_accepts_the_judges_reading_only(finished_run, capsys):
    from emloc.exercises import check_subject_share
    results = finished_run.results()
    images = denoiser.stored_samples(results["samples"]["transfer_corrected"])[denoiser.HELD_OUT_DIGIT]
    seen = denoiser.judged(torch.tensor(images * 2 - 1, dtype=torch.float32).unsqueeze(1))
    right = float((seen == denoiser.HELD_OUT_DIGIT).mean())
    assert check_subject_share(right, results)
    assert not check_subject_share(right + 0.3, results)
    assert not check_subject_share("garbage", results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("✅") and all(line.startswith("❌") for line in lines[1:])
