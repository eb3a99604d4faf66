"""The run directory and the stages: calibrate -> build -> train -> correct -> evaluate.

Every stage reads the previous stage's artifacts from the run directory and writes its own
(atomically, with a ``manifest.json`` written last), so any stage can resume from a finished one.
A stage's manifest records a fingerprint of the config it depends on; a finished stage whose
fingerprint still matches is reused by :func:`run_pipeline`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from emloc import baselines, io
from emloc.calibration import CalibrationStats, collect_statistics
from emloc.config import RunConfig
from emloc.correction import correct_adapter
from emloc.data import TaskData, encode_examples, load_task_data
from emloc.emulator import EmulatorFactors, build_factors, count_parameters, emulate
from emloc.errors import EmlocError
from emloc.evaluation import evaluate_variants
from emloc.lora import LossCallback, load_adapter, train_lora
from emloc.models import load_model, load_tokenizer, resolve_device

FORMAT_VERSION = 1
VARIANTS = ["zero_shot", "emulator_lora", "transfer_uncorrected", "transfer_corrected", "full_lora"]
ADAPTERS = {"emulator": "emulator_lora", "original": "full_lora", "corrected": "corrected", "recovered": "recovered_lora"}
"""``recovered``: a baseline emulator's adapter in the original shapes (layer drop / prune only)."""
CORRECTION_SKIPPED = "correction skipped: it applies to SVD emulators only (layer_drop/prune have no W')"


def _fingerprint_parts(config: RunConfig) -> dict[str, dict]:
    c = config.to_dict()
    base = {k: c[k] for k in ("model", "dtype", "seed")} | {"data": c["data"], "targets": c["emulator"]["target_modules"]}
    return {
        "calibrate": base,
        "build": base | {"emulator": c["emulator"]},
        "train_emulator": base | {"emulator": c["emulator"], "lora": c["lora"]},
        "train_original": base | {"lora": c["lora"]},
        "correct": base | {"emulator": c["emulator"], "lora": c["lora"], "correction": c["correction"]},
        "evaluate": c,
    }


def fingerprint(config: RunConfig, stage: str) -> str:
    text = json.dumps({"version": FORMAT_VERSION, **_fingerprint_parts(config)[stage]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Run:
    """A run directory with its config; loads each stage's artifacts on demand."""

    def __init__(self, directory: str | Path, config: RunConfig | None = None, progress: bool = True):
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise EmlocError(f"run directory {self.dir} is a file: give --out a folder path")
        self.config = config or self._stored_config()
        self.progress = progress
        self.device = resolve_device(self.config.device)
        self._tokenizer = None
        self._data: TaskData | None = None
        self._model = None

    def _stored_config(self) -> RunConfig:
        path = self.dir / "config.yaml"
        if not path.exists():
            return RunConfig()
        return RunConfig.from_dict(io.read_yaml(path))

    def save_config(self) -> None:
        io.write_yaml(self.dir / "config.yaml", self.config.to_dict())

    # ---- shared inputs ----
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.model, self.config.trust_remote_code)
        return self._tokenizer

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = load_task_data(self.config.data, self.config.seed)
        return self._data

    def features(self, split: str) -> list[dict]:
        return encode_examples(self.tokenizer, self.data.task, getattr(self.data, split), self.config.data.max_length)

    def fresh_model(self):
        """A newly loaded original model (stages that wrap it with LoRA must not share it)."""
        return load_model(self.config.model, self.device, self.config.dtype, self.config.trust_remote_code)

    @property
    def model(self):
        """The original model, loaded once and never modified."""
        if self._model is None:
            self._model = self.fresh_model()
        return self._model

    # ---- manifests ----
    def manifest_path(self, stage: str) -> Path:
        return self.dir / "manifests" / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        path = self.manifest_path(stage)
        if not path.exists():
            return False
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        return manifest.get("fingerprint") == fingerprint(self.config, stage)

    def require(self, stage: str, command: str) -> None:
        if not self.manifest_path(stage).exists():
            raise EmlocError(f"{self.dir} has no finished '{stage}' stage: run `emloc {command} --out {self.dir}` first")
        if not self.is_done(stage):
            raise EmlocError(f"the '{stage}' stage in {self.dir} was made with a different config or an older "
                             f"version: re-run `emloc {command} --out {self.dir}` or use a new --out")

    def finish(self, stage: str, seconds: float, **extra) -> None:
        io.write_json(self.manifest_path(stage), {"stage": stage, "fingerprint": fingerprint(self.config, stage),
                                                  "format_version": FORMAT_VERSION, "seconds": seconds, **extra})

    def stage_seconds(self) -> dict[str, float]:
        out = {}
        for path in sorted((self.dir / "manifests").glob("*.json")):
            out[path.stem] = round(io.read_json(path).get("seconds", 0.0), 2)
        return out

    # ---- artifacts ----
    def stats(self) -> CalibrationStats:
        self.require("calibrate", "calibrate")
        meta = io.read_json(self.dir / "calibration" / "stats.json")
        covariances = io.read_tensors(self.dir / "calibration" / "stats.safetensors")
        return CalibrationStats(covariances, meta["input_of"], meta["token_counts"], meta["n_samples"])

    @property
    def structured(self) -> bool:
        """True for the layer-drop and pruning baselines (no low-rank factors, no correction)."""
        return baselines.is_structured(self.config.emulator.method)

    def factors(self) -> EmulatorFactors | baselines.StructuredEmulator:
        self.require("build", "build")
        folder = self.dir / "emulator"
        if self.structured:
            return baselines.load_structured(folder)
        tensors = io.read_tensors(folder / "factors.safetensors")
        spectra_flat = io.read_tensors(folder / "spectra.safetensors")
        report = pd.read_csv(folder / "report.csv")
        names = list(report["module"])
        spectra = {n: {"whitened": spectra_flat[f"{n}.whitened"], "plain": spectra_flat[f"{n}.plain"]} for n in names}
        method = io.read_json(self.manifest_path("build")).get("method", "activation_aware")
        return EmulatorFactors({n: tensors[f"{n}.u"] for n in names}, {n: tensors[f"{n}.v"] for n in names},
                               spectra, report, method)

    def adapter_dir(self, which: str) -> Path:
        return self.dir / "adapters" / ADAPTERS[which]

    def history(self, which: str) -> dict:
        return io.read_json(self.dir / "training" / f"{ADAPTERS[which]}.json")

    def correction_report(self) -> pd.DataFrame:
        self.require("correct", "correct")
        return pd.read_csv(self.dir / "correction" / "report.csv")

    def correction_tensors(self) -> dict[str, torch.Tensor]:
        self.require("correct", "correct")
        return io.read_tensors(self.dir / "correction" / "subspace.safetensors")

    def results(self) -> dict:
        self.require("evaluate", "evaluate")
        return io.read_json(self.dir / "results.json")

    def emulator(self, factors: EmulatorFactors | None = None):
        """A fresh emulator model (original architecture with low-rank layers)."""
        factors = factors or self.factors()
        if isinstance(factors, baselines.StructuredEmulator):
            return baselines.apply_structured(self.fresh_model(), factors)
        return emulate(self.fresh_model(), factors, copy_model=False)


def _timed(function: Callable) -> tuple:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


# ---- stages ----------------------------------------------------------------------------------

def calibrate(run: Run) -> CalibrationStats:
    """Stage 1a: ``C`` per distinct linear input on the calibration samples."""
    run.save_config()
    stats, seconds = _timed(lambda: collect_statistics(run.model, run.features("calibration"), run.config.emulator.target_modules,
                                                       run.tokenizer.pad_token_id, progress=run.progress))
    folder = run.dir / "calibration"
    io.write_tensors(folder / "stats.safetensors", stats.covariances)
    io.write_json(folder / "stats.json", {"input_of": stats.input_of, "token_counts": stats.token_counts,
                                         "n_samples": stats.n_samples})
    run.finish("calibrate", seconds, n_samples=stats.n_samples, distinct_inputs=len(stats.covariances))
    return stats


def build(run: Run, stats: CalibrationStats | None = None) -> EmulatorFactors:
    """Stage 1b: low-rank factors, spectra and the per-layer report."""
    stats = stats or run.stats()
    run.save_config()
    if run.structured:
        return _build_structured(run, stats)
    factors, seconds = _timed(lambda: build_factors(run.model, stats, run.config.emulator, progress=run.progress))
    folder = run.dir / "emulator"
    io.write_tensors(folder / "factors.safetensors", {f"{n}.{k}": t for n in factors.u for k, t in
                                                      (("u", factors.u[n]), ("v", factors.v[n]))})
    io.write_tensors(folder / "spectra.safetensors", {f"{n}.{k}": t for n, d in factors.spectra.items() for k, t in d.items()})
    with io.atomic_path(folder / "report.csv") as tmp:
        factors.report.to_csv(tmp, index=False)
    params_original = count_parameters(run.model)
    saved = int((factors.report["params_before"] - factors.report["params_after"]).sum())
    run.finish("build", seconds, method=factors.method, params_original=params_original,
               params_emulator=params_original - saved)
    return factors


def _build_structured(run: Run, stats: CalibrationStats) -> baselines.StructuredEmulator:
    emulator, seconds = _timed(lambda: baselines.build_structured(run.model, stats, run.config.emulator))
    baselines.save_structured(emulator, run.dir / "emulator")
    params_emulator = count_parameters(baselines.apply_structured(run.fresh_model(), emulator))
    run.finish("build", seconds, method=emulator.method, params_original=count_parameters(run.model),
               params_emulator=params_emulator)
    return emulator


def train(run: Run, which: str = "emulator", on_loss: LossCallback | None = None) -> dict:
    """Stage 2: LoRA on the emulator (``which='emulator'``) or on the original model (``'original'``)."""
    if which not in ("emulator", "original"):
        raise EmlocError(f"cannot train on {which!r}: use 'emulator' or 'original'")
    stage = f"train_{which}"
    model = run.emulator() if which == "emulator" else run.fresh_model()
    run.save_config()
    result = train_lora(model, run.features("train"), run.config.lora, run.config.emulator.target_modules,
                        run.tokenizer.pad_token_id, seed=run.config.seed, on_loss=on_loss, progress=run.progress)
    with io.atomic_dir(run.adapter_dir(which)) as tmp:
        result.model.save_pretrained(tmp)
    summary = {"which": which, "history": result.history, "seconds": result.seconds,
               "seconds_per_step": result.seconds_per_step, "trainable_parameters": _trainable(result.model),
               "model_parameters": count_parameters(result.model.get_base_model()) - _trainable(result.model)}
    if which == "emulator" and run.structured:
        _save_recovered(run, result.model)
    io.write_json(run.dir / "training" / f"{ADAPTERS[which]}.json", summary)
    run.finish(stage, result.seconds)
    return summary


def _save_recovered(run: Run, trained) -> None:
    """The baseline's adapter zero filled / completed to the original model's shapes and keys."""
    cfg = run.config
    recovered = baselines.recover_adapter(trained, run.fresh_model(), cfg.lora, cfg.emulator.target_modules,
                                          cfg.seed, run.factors())
    with io.atomic_dir(run.adapter_dir("recovered")) as tmp:
        recovered.save_pretrained(tmp)


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def correct(run: Run, factors: EmulatorFactors | None = None) -> pd.DataFrame:
    """Stage 3: correct the emulator-trained adapter for the original model; save it as a peft folder."""
    run.require("train_emulator", "train")
    run.save_config()
    if run.structured:
        run.finish("correct", 0.0, skipped=CORRECTION_SKIPPED)
        return pd.DataFrame()
    factors = factors or run.factors()
    start = time.perf_counter()
    peft_model = load_adapter(run.fresh_model(), run.adapter_dir("emulator"))
    report, tensors = correct_adapter(peft_model, factors, run.config.correction.clamp)
    seconds = time.perf_counter() - start
    with io.atomic_dir(run.adapter_dir("corrected")) as tmp:
        peft_model.save_pretrained(tmp)
    io.write_tensors(run.dir / "correction" / "subspace.safetensors", tensors)
    with io.atomic_path(run.dir / "correction" / "report.csv") as tmp:
        report.to_csv(tmp, index=False)
    run.finish("correct", seconds, clamp=run.config.correction.clamp,
               modules_clamped=int((report["clamped_columns"] > 0).sum()), modules=len(report))
    return report


@contextlib.contextmanager
def _variant(load: Callable):
    model = load()
    try:
        yield model
    finally:
        del model


def variant_loaders(run: Run, factors: EmulatorFactors) -> dict[str, Callable]:
    """name -> loader of the model for each of the five evaluated variants."""
    original = lambda adapter: (lambda: load_adapter(run.fresh_model(), run.adapter_dir(adapter)))
    return {
        "zero_shot": lambda: run.model,
        "emulator_lora": lambda: load_adapter(run.emulator(factors), run.adapter_dir("emulator")),
        "transfer_uncorrected": original("recovered" if run.structured else "emulator"),
        "transfer_corrected": original("corrected"),
        "full_lora": original("original"),
    }


def evaluate(run: Run, variants: list[str] | None = None) -> dict:
    """Evaluate the variants on the test split; write ``results.json``."""
    run.require("build", "build")
    factors = run.factors()
    loaders = variant_loaders(run, factors)
    needs = {"emulator_lora": "train_emulator", "transfer_uncorrected": "train_emulator",
             "transfer_corrected": "correct", "full_lora": "train_original"}
    chosen = variants or [v for v in VARIANTS if v not in needs or run.is_done(needs[v])]
    if run.structured:
        chosen = [v for v in chosen if v != "transfer_corrected"]
    run.save_config()
    cfg = run.config
    start = time.perf_counter()
    raw = evaluate_variants({v: (lambda v=v: _variant(loaders[v])) for v in chosen}, run.tokenizer, run.data,
                            cfg.data.max_length, cfg.evaluation.max_new_tokens, cfg.evaluation.batch_size, run.progress)
    seconds = time.perf_counter() - start
    build_manifest = io.read_json(run.manifest_path("build"))
    run.finish("evaluate", seconds)
    results = {
        "variants": {v: {"accuracy": r["accuracy"], "loss": r["loss"], "n": r["n"]} for v, r in raw.items()},
        "predictions": {v: r["predictions"] for v, r in raw.items()},
        "parameters": {"original": build_manifest["params_original"], "emulator": build_manifest["params_emulator"]},
        "config": cfg.to_dict(),
        "stage_seconds": run.stage_seconds(),
        "notes": [CORRECTION_SKIPPED] if run.structured else [],
    }
    io.write_json(run.dir / "results.json", results)
    return results


def results_table(results: dict) -> pd.DataFrame:
    """The variants as a table: accuracy, loss, n."""
    return pd.DataFrame(results["variants"]).T.reindex([v for v in VARIANTS if v in results["variants"]])


def run_pipeline(run: Run, force: bool = False, on_loss: Callable[[str, int, float], None] | None = None) -> dict:
    """All stages in order, reusing finished ones whose config still matches (unless ``force``)."""
    if force and run.dir.exists():
        shutil.rmtree(run.dir / "manifests", ignore_errors=True)
    steps = [
        ("calibrate", lambda: calibrate(run)),
        ("build", lambda: build(run)),
        ("train_emulator", lambda: train(run, "emulator", _tagged(on_loss, "emulator"))),
        ("train_original", lambda: train(run, "original", _tagged(on_loss, "original"))),
        ("correct", lambda: correct(run)),
        ("evaluate", lambda: evaluate(run)),
    ]
    for stage, step in steps:
        if stage == "evaluate" or not run.is_done(stage):
            step()
    return run.results()


def _tagged(on_loss, which: str):
    return None if on_loss is None else (lambda step, loss: on_loss(which, step, loss))
