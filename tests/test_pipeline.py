"""The whole pipeline and the CLI on a tiny model folder: artifacts, results schema, resume."""
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import tiny_run_config
from emloc import cli, pipeline
from emloc.config import RunConfig
from emloc.rundir import ADAPTERS, fingerprint
from emloc.stages import STAGE, STAGES, VARIANT_SPECS, with_needs
from emloc.models import tiny_llama


def test_pipeline_writes_every_artifact_and_results(tiny_model_dir, tmp_path):
    run = pipeline.Run(tmp_path / "run", tiny_run_config(tiny_model_dir), progress=False)
    losses = []
    results = pipeline.run_pipeline(run, on_loss=lambda which, step, loss: losses.append((which, step, loss)))
    assert set(results["variants"]) == set(pipeline.VARIANTS)
    for name, row in results["variants"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == 6 and row["loss"] > 0, name
    assert {w for w, _, _ in losses} == {"emulator", "original"} and len(losses) == 6
    for folder in ("emulator_lora", "full_lora", "corrected"):
        assert (run.dir / "adapters" / folder / "adapter_config.json").exists()
    assert (run.dir / "emulator" / "report.csv").exists() and (run.dir / "correction" / "report.csv").exists()
    assert results["parameters"]["emulator"] < results["parameters"]["original"]
    assert not list(run.dir.rglob("*.tmp"))
    # the registry lists everything the stages write (sweeps hard-link exactly those paths)
    listed = {path for stage in STAGES for path in stage.paths}
    written = {str(p.relative_to(run.dir)) for folder in ("adapters", "training") for p in (run.dir / folder).iterdir()}
    written |= {p.name for p in run.dir.iterdir() if p.name not in ("adapters", "training", "manifests", "config.yaml")}
    assert written <= listed and {p.stem for p in (run.dir / "manifests").iterdir()} == {s.name for s in STAGES}
    # the corrected adapter is a standard peft folder
    corrected = PeftModel.from_pretrained(tiny_llama(seed=0), str(run.dir / "adapters" / "corrected"))
    assert sum("lora_A" in n for n, _ in corrected.named_parameters()) == 14


def test_finished_stages_are_reused_and_config_changes_redo_them(tiny_model_dir, tmp_path):
    config = tiny_run_config(tiny_model_dir)
    run = pipeline.Run(tmp_path / "run", config, progress=False)
    pipeline.run_pipeline(run)
    factors_before = load_file(run.dir / "emulator" / "factors.safetensors")
    stamp = (run.dir / "manifests" / "build.json").stat().st_mtime_ns
    pipeline.run_pipeline(pipeline.Run(run.dir, config, progress=False))
    assert (run.dir / "manifests" / "build.json").stat().st_mtime_ns == stamp
    # the one rule: a stage is redone when it is not done, or when a stage it needs was redone in the same call
    assert pipeline.run_stages(pipeline.Run(run.dir, config, progress=False)) == []
    (run.dir / "manifests" / "train_emulator.json").unlink()
    redone = pipeline.run_stages(pipeline.Run(run.dir, config, progress=False), "correct")
    assert redone == ["train_emulator", "correct"]
    assert pipeline.run_stages(pipeline.Run(run.dir, config, progress=False)) == ["evaluate"]
    changed = tiny_run_config(tiny_model_dir, emulator={"ratio": 0.3})
    run2 = pipeline.Run(run.dir, changed, progress=False)
    assert run2.is_done("calibrate") and not run2.is_done("build") and not run2.is_done("correct")
    pipeline.run_pipeline(run2)
    factors_after = load_file(run.dir / "emulator" / "factors.safetensors")
    name = next(k for k in factors_before if k.endswith(".u"))
    assert factors_after[name].shape[1] < factors_before[name].shape[1]


def test_cli_stage_by_stage_and_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(tiny_run_config(tiny_model_dir).to_dict()), encoding="utf-8")
    base = ["--out", str(out), "--config", str(config)]
    assert cli.main(["calibrate", *base]) == 0
    assert cli.main(["build", *base, "--ratio", "0.4"]) == 0
    assert cli.main(["train", "--out", str(out), "--on", "both"]) == 0  # config is read back from the run
    assert cli.main(["correct", "--out", str(out), "--clamp", "0"]) == 0
    assert cli.main(["evaluate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transfer_corrected" in printed and "full_lora" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["emulator"]["ratio"] == 0.4 and results["config"]["correction"]["clamp"] is None
    assert set(results["variants"]) == set(pipeline.VARIANTS)


def test_cli_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "r"), "--ratio", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("emloc: error:") and "ratio" in err[0]


def test_stage_registry_is_consistent():
    names = [s.name for s in STAGES]
    for i, stage in enumerate(STAGES):
        assert all(need in names[:i] for need in stage.needs), stage.name  # needs run earlier
        assert set(with_needs([stage.name])) == {stage, *(STAGE[n] for n in stage.needs)}
        assert stage.adapter is None or stage.adapter in ADAPTERS
    for variant in VARIANT_SPECS:
        assert variant.stage in STAGE and (variant.adapter is None or variant.adapter in ADAPTERS)
    assert [v.name for v in VARIANT_SPECS] == pipeline.VARIANTS
    assert set(pipeline.STAGE_FUNCTIONS) == set(STAGE)  # every stage has its function, and only those
    from widgets._base import VARIANT_COLOURS, VARIANT_LABELS
    assert set(VARIANT_LABELS) == set(VARIANT_COLOURS) == set(pipeline.VARIANTS)  # no view misses a variant


def test_fingerprints_follow_the_config_sections_each_stage_lists():
    base = RunConfig()
    changes = {"emulator": {"emulator": {"ratio": 0.3}}, "lora": {"lora": {"steps": 7}},
               "correction": {"correction": {"clamp": 1.0}}, "evaluation": {"evaluation": {"batch_size": 4}}}
    for section, change in changes.items():
        changed = RunConfig.from_dict(change)
        for stage in STAGES:
            covered = stage.config is None or section in stage.config
            assert (fingerprint(base, stage.name) != fingerprint(changed, stage.name)) == covered, \
                (section, stage.name)
    fewer_calibration = RunConfig.from_dict({"data": {"n_calibration": 8}})
    for stage in STAGES:
        differs = fingerprint(base, stage.name) != fingerprint(fewer_calibration, stage.name)
        assert differs == stage.uses_calibration, stage.name
