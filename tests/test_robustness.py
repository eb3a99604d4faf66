"""Bad inputs and faults: one line that names the problem and the fix, exit code 2, nothing half-written.

The catalogue with what happens for each case is docs/bad_inputs.md; every row names its test here.
CLI cases run ``emloc.cli.main`` in-process on a tiny random Llama saved to disk (plus one real
subprocess of the console script); core cases call the functions the notebooks and widgets call.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

from emloc import io, model_tasks, pipeline
from emloc.calibration import CalibrationStats, collect_statistics
from emloc.cli import main
from emloc.config import LLAMA_PROJECTIONS, EmulatorConfig, LoraConfigSpec, RunConfig
from emloc.data import load_task_data
from emloc.svd_emulator import build_factors, emulate
from emloc.errors import EmlocError
from emloc.lora import add_lora, load_adapter
from emloc.models import load_model, load_tokenizer, tiny_llama

SENTINEL_ENV = "EMLOC_TEST_SENTINEL"
TINY = {"device": "cpu",
        "data": {"n_train": 24, "n_calibration": 6, "n_test": 3, "max_length": 80},
        "lora": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "learning_rate": 5e-3},
        "evaluation": {"max_new_tokens": 1, "batch_size": 8}}


# ---- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def save_model(folder: Path, tok, **tiny_kwargs) -> Path:
    tiny_llama(seed=0, **tiny_kwargs).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    return save_model(tmp_path_factory.mktemp("tiny-model"), tok)


@pytest.fixture
def config_file(tmp_path, model_dir) -> Path:
    """A YAML config for the tiny model: the CLI tests pass it with --config."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_dir), **TINY}))
    return path


def tiny_config(model_dir: Path, **changes) -> RunConfig:
    from emloc.config import merge_dicts
    return RunConfig.from_dict(merge_dicts({"model": str(model_dir), **TINY}, changes))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir) -> Path:
    """A finished tiny run; tests copy it before damaging it."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    pipeline.run_pipeline(pipeline.Run(folder, tiny_config(model_dir), progress=False))
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit 2 and one 'emloc: error:' line, the last; return that line.

    (Progress bars of work done before the problem showed up, e.g. loading the model, may precede it.)
    """
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert code == 2, captured.err
    assert errors == [lines[-1]] and lines[-1].startswith("emloc: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[-1]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders an atomic write would leave behind if it failed."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []


def manifests(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "manifests").glob("*.json"))


def write_bytes_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- data files ------------------------------------------------------------------------------

def test_data_file_missing(capsys, tmp_path, config_file):
    line = cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file, "--data", tmp_path / "nope.jsonl")
    assert "nope.jsonl does not exist" in line
    assert not (tmp_path / "r").exists()


def test_data_file_empty(capsys, tmp_path, config_file):
    data = write_bytes_file(tmp_path / "empty.jsonl", b"\n  \n")
    assert "is empty" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file, "--data", data)
    assert not (tmp_path / "r").exists()


def test_jsonl_malformed_line(capsys, tmp_path, config_file):
    data = write_bytes_file(tmp_path / "bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    assert "line 2 is not valid JSON" in cli_error(capsys, "calibrate", "--out", tmp_path / "r", "--config", config_file,
                                                   "--data", data)


def test_jsonl_wrong_keys(capsys, tmp_path, config_file):
    data = write_bytes_file(tmp_path / "keys.jsonl", b'{"question": "a", "answer": "b"}\n' * 3)
    line = cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file, "--data", data)
    assert "record 1 lacks 'prompt' and 'response'" in line and "answer" in line


def test_csv_wrong_header_and_header_only(tmp_path):
    wrong = write_bytes_file(tmp_path / "wrong.csv", b"input,output\n1+1,2\n2+2,4\n")
    with pytest.raises(EmlocError, match="lacks 'prompt' and 'response'"):
        load_task_data(RunConfig.from_dict({"data": {"path": str(wrong)}}).data, 0)
    header_only = write_bytes_file(tmp_path / "header.csv", b"prompt,response\n")
    with pytest.raises(EmlocError, match="has 0 record"):
        load_task_data(RunConfig.from_dict({"data": {"path": str(header_only)}}).data, 0)


def test_csv_short_row_and_empty_response(tmp_path):
    short = write_bytes_file(tmp_path / "short.csv", b"prompt,response\nwhat is 1+1,2\nwhat is 2+2\n")
    with pytest.raises(EmlocError, match="record 2 has an empty or non-text prompt/response"):
        load_task_data(RunConfig.from_dict({"data": {"path": str(short)}}).data, 0)


def test_data_not_utf8(capsys, tmp_path, config_file):
    data = write_bytes_file(tmp_path / "latin1.jsonl", '{"prompt": "café", "response": "ü"}\n'.encode("latin-1"))
    assert "is not UTF-8 text" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file, "--data", data)


def test_data_wrong_suffix(tmp_path):
    data = write_bytes_file(tmp_path / "data.txt", b"prompt: a\n")
    with pytest.raises(EmlocError, match="use .jsonl or .csv"):
        load_task_data(RunConfig.from_dict({"data": {"path": str(data)}}).data, 0)


def test_unknown_task(capsys, tmp_path, config_file):
    assert "unknown task 'poetry'" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file,
                                                "--task", "poetry")


def test_max_length_leaves_no_response(capsys, tmp_path, config_file):
    out = tmp_path / "r"
    assert main(["calibrate", "--out", str(out), "--config", str(config_file)]) == 0
    assert main(["build", "--out", str(out)]) == 0
    capsys.readouterr()
    config = yaml.safe_load(config_file.read_text())
    config["data"]["max_length"] = 1
    config_file.write_text(yaml.safe_dump(config))
    line = cli_error(capsys, "train", "--out", out, "--config", config_file, "--on", "original")
    assert "raise data.max_length" in line
    assert "train_original" not in manifests(out) and not (out / "adapters" / "full_lora").exists()


# ---- config and flags ------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", ["1.5", "0", "-0.2", "1"])
def test_ratio_outside_unit_interval(capsys, tmp_path, config_file, ratio):
    assert "outside (0, 1)" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file, "--ratio", ratio)
    assert not (tmp_path / "r").exists()


def test_ratio_pattern_outside_unit_interval_and_bad_regex():
    with pytest.raises(EmlocError, match=r"ratio_patterns\['.\*mlp.\*'\] = 1.2 is outside \(0, 1\)"):
        RunConfig.from_dict({"emulator": {"ratio_patterns": {".*mlp.*": 1.2}}})
    with pytest.raises(EmlocError, match="is not a valid regex"):
        RunConfig.from_dict({"emulator": {"ratio_patterns": {"mlp[": 0.4}}})
    with pytest.raises(EmlocError, match="is not a valid regex"):
        RunConfig.from_dict({"emulator": {"target_modules": ["q_proj", "(v_proj"]}})


def test_lora_rank_at_or_above_layer_width(capsys, tmp_path, config_file):
    # the tiny model's narrowest targeted layer is k_proj: 64 -> 32, so min(in, out) = 32
    line = cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file, "--lora-r", "32")
    assert "lora.r = 32 is not below min(in, out) = 32 of model.layers.0.self_attn.k_proj" in line
    assert not (tmp_path / "r").exists()  # checked before any stage runs
    with pytest.raises(EmlocError, match="lora.r = 40"):
        add_lora(tiny_llama(), LoraConfigSpec(r=40), LLAMA_PROJECTIONS, seed=0)
    add_lora(tiny_llama(), LoraConfigSpec(r=31), LLAMA_PROJECTIONS, seed=0)  # just below is fine


def test_unknown_target_module(capsys, tmp_path, config_file):
    config = yaml.safe_load(config_file.read_text())
    config["emulator"] = {"target_modules": ["q_proj", "qkv_proj"]}
    config_file.write_text(yaml.safe_dump(config))
    line = cli_error(capsys, "calibrate", "--out", tmp_path / "r", "--config", config_file)
    assert "'qkv_proj' matches no linear layer" in line
    assert manifests(tmp_path / "r") == [] and leftovers(tmp_path / "r") == []


@pytest.mark.parametrize("text, expected", [
    ("emulator:\n  ratio: [0.5\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("emulator:\n  ratoi: 0.5\n", "unknown key 'config.emulator.ratoi'"),
    ("lora:\n  r: eight\n", "lora.r must be a int"),
    ("trust_remote_code: 'yes'\n", "trust_remote_code must be true or false"),
])
def test_bad_config_file(capsys, tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = cli_error(capsys, "run", "--out", tmp_path / "r", "--config", path)
    assert expected in line and "bad.yaml" in line


def test_config_file_missing_or_not_utf8(capsys, tmp_path):
    assert "does not exist" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", tmp_path / "none.yaml")
    latin = write_bytes_file(tmp_path / "latin.yaml", "model: 'caf\xe9'\n".encode("latin-1"))
    assert "is not UTF-8 text" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", latin)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(capsys, tmp_path, config_file):
    assert "no CUDA GPU is available" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file,
                                                   "--device", "cuda")


# ---- models ----------------------------------------------------------------------------------

def test_model_path_missing_or_not_a_model(capsys, tmp_path, config_file):
    assert "does not exist" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file,
                                         "--model", tmp_path / "no-model")
    (tmp_path / "empty-folder").mkdir()
    assert "is not a model folder (no config.json)" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config",
                                                                 config_file, "--model", tmp_path / "empty-folder")
    bad = tmp_path / "bad-config"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert "cannot load model" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file,
                                            "--model", bad)


class _Sentinel:
    """Unpickling this writes a file: proof that a pickle was (not) loaded."""

    def __reduce__(self):
        return (Path(os.environ[SENTINEL_ENV]).write_text, ("unpickled",))


def test_pickled_weights_are_never_loaded(tmp_path, model_dir, monkeypatch):
    sentinel = tmp_path / "sentinel"
    monkeypatch.setenv(SENTINEL_ENV, str(sentinel))
    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"payload": _Sentinel()}, handle)
    with pytest.raises(EmlocError, match="no file named model.safetensors"):
        load_model(str(folder))
    # the same for a peft adapter folder holding only adapter_model.bin
    adapter = tmp_path / "bin-adapter"
    add_lora(tiny_llama(), LoraConfigSpec(r=4), LLAMA_PROJECTIONS, seed=0).save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    shutil.copy(folder / "pytorch_model.bin", adapter / "adapter_model.bin")
    with pytest.raises(EmlocError, match="needs adapter_config.json and adapter_model.safetensors"):
        load_adapter(tiny_llama(), adapter)
    assert not sentinel.exists()


def test_remote_code_runs_only_when_asked(tmp_path, model_dir, monkeypatch):
    sentinel = tmp_path / "sentinel"
    monkeypatch.setenv(SENTINEL_ENV, str(sentinel))
    folder = tmp_path / "custom"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="emloc_custom", auto_map={"AutoConfig": "custom_code.CustomConfig",
                                                       "AutoModelForCausalLM": "custom_code.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom_code.py").write_text(
        f"import os, pathlib\npathlib.Path(os.environ['{SENTINEL_ENV}']).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'emloc_custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    assert RunConfig().trust_remote_code is False
    with pytest.raises(EmlocError, match="cannot load model"):
        load_model(str(folder))
    assert not sentinel.exists()


def test_truncated_model_weights(capsys, tmp_path, model_dir, config_file):
    folder = tmp_path / "truncated-model"
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot load model" in cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file,
                                            "--model", folder)


def test_nan_or_inf_in_weights(capsys, tmp_path, tok, config_file):
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("inf")
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    line = cli_error(capsys, "run", "--out", tmp_path / "r", "--config", config_file, "--model", folder)
    assert "has NaN or Inf in model.layers.0.self_attn.q_proj.weight" in line
    assert not (tmp_path / "r").exists()


# ---- calibration and statistics ----------------------------------------------------------------

def test_fewer_calibration_tokens_than_layer_width(tok):
    """One short sample (< 64 tokens, the hidden width; < 128, down_proj's input): C is singular, build still works."""
    model = tiny_llama(seed=0)
    features = [{"input_ids": tok("Two plus two?")["input_ids"]}]
    stats = collect_statistics(model, features, LLAMA_PROJECTIONS, tok.pad_token_id, progress=False)
    assert max(stats.token_counts.values()) < 64
    assert torch.linalg.matrix_rank(stats.C("model.layers.0.mlp.down_proj")) <= max(stats.token_counts.values())
    factors = build_factors(model, stats, EmulatorConfig(ratio=0.5), progress=False)
    assert all(torch.isfinite(u).all() and torch.isfinite(factors.v[n]).all() for n, u in factors.u.items())
    assert factors.report["calibration_error"].between(0, 1).all()
    emulator = emulate(model, factors)
    logits = emulator(input_ids=torch.tensor([features[0]["input_ids"]])).logits
    assert torch.isfinite(logits).all()


def test_nan_in_statistics(capsys, tok, run_copy):
    model = tiny_llama(seed=0)
    stats = collect_statistics(model, [{"input_ids": tok("hello there")["input_ids"]}], LLAMA_PROJECTIONS,
                               tok.pad_token_id, progress=False)
    leader = next(iter(stats.covariances))
    stats.covariances[leader][0, 0] = float("nan")
    with pytest.raises(EmlocError, match=f"calibration statistics of {leader} contain NaN or Inf"):
        build_factors(model, stats, EmulatorConfig(), progress=False)
    # the same from a tampered run directory, through the CLI
    path = run_copy / "calibration" / "stats.safetensors"
    tensors = io.read_tensors(path)
    tensors[leader][1, 1] = float("inf")
    io.write_tensors(path, tensors)
    assert "contain NaN or Inf" in cli_error(capsys, "build", "--out", run_copy)


# ---- adapters ----------------------------------------------------------------------------------

def test_adapter_from_another_model(tmp_path):
    narrow = add_lora(tiny_llama(hidden_size=32, intermediate_size=64), LoraConfigSpec(r=4), LLAMA_PROJECTIONS, seed=0)
    narrow.save_pretrained(tmp_path / "narrow")
    with pytest.raises(EmlocError, match="does not fit this model"):
        load_adapter(tiny_llama(), tmp_path / "narrow")
    shallow = add_lora(tiny_llama(num_layers=1), LoraConfigSpec(r=4), LLAMA_PROJECTIONS, seed=0)
    shallow.save_pretrained(tmp_path / "shallow")  # fits layer 0, silently leaves layer 1 untouched in peft
    with pytest.raises(EmlocError, match=r"has no weights for .*layers\.1\..* \(14 missing\)"):
        load_adapter(tiny_llama(num_layers=2), tmp_path / "shallow")


def test_adapter_from_another_run(capsys, tmp_path, run_copy, model_dir):
    # an emulator adapter trained on a different emulator (ratio 0.3) of the same model
    other_run = pipeline.Run(tmp_path / "other", tiny_config(model_dir, emulator={"ratio": 0.3}), progress=False)
    pipeline.calibrate(other_run)
    pipeline.build(other_run)
    pipeline.train(other_run, "emulator")
    target = pipeline.Run(run_copy, progress=False).adapter_dir("emulator")
    shutil.rmtree(target)
    shutil.copytree(other_run.adapter_dir("emulator"), target)
    line = cli_error(capsys, "correct", "--out", run_copy)
    assert "was made with a different config" in line or "does not belong to this run" in line
    run = pipeline.Run(run_copy, progress=False)
    with pytest.raises(EmlocError, match="does not belong to this run's model and emulator"):
        run.check_adapter("emulator")
    assert not run.is_done("train_emulator")  # so `emloc run` retrains it instead of trusting it


def test_nan_in_adapter(capsys, run_copy):
    path = run_copy / "adapters" / "emulator_lora" / "adapter_model.safetensors"
    tensors = io.read_tensors(path)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    io.write_tensors(path, tensors, metadata={"format": "pt"})
    line = cli_error(capsys, "evaluate", "--out", run_copy)
    assert "has NaN or Inf in" in line and "re-train it" in line
    assert "evaluate" not in manifests(run_copy) and leftovers(run_copy) == []


# ---- run directories ---------------------------------------------------------------------------

def test_run_directory_missing_empty_or_a_file(capsys, tmp_path):
    missing = pipeline.Run(tmp_path / "missing", progress=False)
    with pytest.raises(EmlocError, match="run directory .*missing does not exist"):
        missing.results()
    (tmp_path / "empty").mkdir()
    empty = pipeline.Run(tmp_path / "empty", progress=False)
    for load in (empty.results, empty.factors, empty.stats, empty.correction_report):
        with pytest.raises(EmlocError, match="has no finished"):
            load()
    assert "does not exist" in cli_error(capsys, "evaluate", "--out", tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_error(capsys, "evaluate", "--out", tmp_path / "file")


def test_run_directory_from_different_config(capsys, run_copy):
    line = cli_error(capsys, "build", "--out", run_copy, "--seed", "7")
    assert "'calibrate' stage" in line and "different config" in line and "re-run `emloc calibrate" in line


def test_run_directory_from_older_version(capsys, run_copy):
    manifest = run_copy / "manifests" / "evaluate.json"
    data = json.loads(manifest.read_text())
    data.update(format_version=0, fingerprint="0123456789abcdef")
    manifest.write_text(json.dumps(data))
    assert not pipeline.Run(run_copy, progress=False).is_done("evaluate")
    with pytest.raises(EmlocError, match="older version"):
        pipeline.Run(run_copy, progress=False).results()
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["emulator"]["rank_rule"] = "legacy"  # a key this version does not know
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    line = cli_error(capsys, "evaluate", "--out", run_copy)
    assert "config.yaml" in line and "unknown key 'config.emulator.rank_rule'" in line
    with pytest.raises(EmlocError, match="from an older or different run"):
        pipeline.Run(run_copy, progress=False)


@pytest.mark.parametrize("artifact", ["emulator/factors.safetensors", "emulator/report.csv",
                                      "adapters/emulator_lora/adapter_model.safetensors"])
def test_truncated_artifact(capsys, run_copy, artifact):
    path = run_copy / artifact
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 3])
    line = cli_error(capsys, "evaluate", "--out", run_copy)
    assert Path(artifact).name in line and "corrupted or truncated" in line and "re-run" in line


def test_corrupted_json_artifacts(capsys, run_copy):
    (run_copy / "results.json").write_text('{"variants": {"zero')
    with pytest.raises(EmlocError, match="results.json is not valid JSON"):
        pipeline.Run(run_copy, progress=False).results()
    (run_copy / "manifests" / "build.json").write_bytes(b"\xff\xfe garbage")
    line = cli_error(capsys, "evaluate", "--out", run_copy)
    assert "'build' stage" in line and "re-run `emloc build" in line


# ---- interruptions and atomic writes -----------------------------------------------------------

def test_interrupted_stage_leaves_nothing_and_is_redone(tmp_path, model_dir, monkeypatch):
    out = tmp_path / "r"
    run = pipeline.Run(out, tiny_config(model_dir), progress=False)
    pipeline.calibrate(run)
    pipeline.build(run)
    before = (out / "emulator" / "factors.safetensors").read_bytes()
    real_write = io.write_tensors
    calls = []

    def crash_on_second_write(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # factors written, spectra not yet: the stage dies half-way
            raise RuntimeError("simulated crash")
        real_write(path, tensors, metadata)

    monkeypatch.setattr(io, "write_tensors", crash_on_second_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.build(pipeline.Run(out, tiny_config(model_dir, emulator={"ratio": 0.3}), progress=False))
    assert "build" not in manifests(out) and leftovers(out) == []
    assert (out / "emulator" / "factors.safetensors").read_bytes() == before  # the old folder is untouched
    monkeypatch.setattr(io, "write_tensors", real_write)
    results = pipeline.run_pipeline(pipeline.Run(out, tiny_config(model_dir), progress=False))
    assert set(manifests(out)) == {"build", "calibrate", "correct", "evaluate", "fidelity", "train_emulator",
                                   "train_original"}
    assert results["variants"]["transfer_corrected"]["n"] == TINY["data"]["n_test"]


def test_keyboard_interrupt_in_cli(capsys, tmp_path, config_file, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_tasks, "train_lora", interrupted)
    out = tmp_path / "r"
    assert main(["run", "--out", str(out), "--config", str(config_file)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert manifests(out) == ["build", "calibrate", "fidelity"] and not (out / "adapters").exists() and leftovers(out) == []
    monkeypatch.undo()
    stats_written = (out / "calibration" / "stats.safetensors").stat().st_mtime_ns
    assert main(["train", "--out", str(out)]) == 0  # resumes from the finished stages
    assert "train_emulator" in manifests(out) and (out / "adapters" / "emulator_lora").is_dir()
    assert (out / "calibration" / "stats.safetensors").stat().st_mtime_ns == stats_written


def test_diverged_training_is_not_saved(capsys, tmp_path, config_file, monkeypatch):
    from emloc.lora import TrainResult
    real_train = model_tasks.train_lora

    def diverging(*args, **kwargs):
        result = real_train(*args, **kwargs)
        return TrainResult(result.model, [(1, 2.5), (2, float("nan"))], result.seconds, result.seconds_per_step)

    monkeypatch.setattr(model_tasks, "train_lora", diverging)
    out = tmp_path / "r"
    line = cli_error(capsys, "run", "--out", out, "--config", config_file)
    assert "diverged (loss nan at step 2)" in line
    assert "train_emulator" not in manifests(out) and not (out / "adapters").exists()


def test_atomic_helpers_leave_no_temp_files(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"old": 1})
    with pytest.raises(ValueError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("crash")
    folder = tmp_path / "folder"
    with io.atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(ValueError):
        with io.atomic_dir(folder) as tmp:
            (tmp / "a.txt").write_text("new")
            raise ValueError("crash")
    with pytest.raises(TypeError):
        io.write_json(tmp_path / "bad.json", {"x": object()})
    assert io.read_json(target) == {"old": 1} and (folder / "a.txt").read_text() == "old"
    assert not (tmp_path / "bad.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "out.json"]


# ---- the console script as a real subprocess ---------------------------------------------------

def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("emloc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "emloc"]


def test_console_script_subprocess(tmp_path, config_file):
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1")
    out = tmp_path / "r"
    bad = subprocess.run([*_console_script(), "run", "--out", str(out), "--config", str(config_file), "--ratio", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"emloc: error: emulator.ratio = 2.0 is outside (0, 1): "
                                               f"choose a parameter-retention ratio such as 0.5"]
    good = subprocess.run([*_console_script(), "calibrate", "--out", str(out), "--config", str(config_file)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "calibrate finished" in good.stdout and manifests(out) == ["calibrate"]
