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
import math
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
from emloc.data import IGNORE_INDEX, TaskData, encode_examples, load_task_data
from emloc.emulator import EmulatorFactors, build_factors, count_parameters, emulate
from emloc.errors import EmlocError
from emloc.evaluation import evaluate_variants
from emloc.lora import LossCallback, check_lora_rank, load_adapter, train_lora
from emloc.models import load_model, load_tokenizer, resolve_device

FORMAT_VERSION = 1
VARIANTS = ["zero_shot", "emulator_lora", "transfer_uncorrected", "transfer_corrected", "full_lora"]
ADAPTERS = {"emulator": "emulator_lora", "original": "full_lora", "corrected": "corrected", "recovered": "recovered_lora"}
"""``recovered``: a baseline emulator's adapter in the original shapes (layer drop / prune only)."""
CORRECTION_SKIPPED = "correction skipped: it applies to SVD emulators only (layer_drop/prune have no W')"
PROVENANCE = "emloc_provenance.json"
ADAPTER_STAGES = {"train_emulator": "emulator", "train_original": "original", "correct": "corrected"}


def _fingerprint_parts(config: RunConfig) -> dict[str, dict]:
    c = config.to_dict()
    base = {k: c[k] for k in ("model", "dtype", "seed")} | {"data": c["data"], "targets": c["emulator"]["target_modules"]}
    # LoRA on the original never sees the calibration subset (train and test splits do not depend on it)
    uncalibrated = base | {"data": {k: v for k, v in c["data"].items() if k != "n_calibration"}}
    return {
        "calibrate": base,
        "build": base | {"emulator": c["emulator"]},
        "train_emulator": base | {"emulator": c["emulator"], "lora": c["lora"]},
        "train_original": uncalibrated | {"lora": c["lora"]},
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
        try:
            return RunConfig.from_dict(io.read_yaml(path))
        except EmlocError as error:
            raise EmlocError(f"{path} (from an older or different run): {error}; fix it or use a new run directory") from None

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
        if stage in ADAPTER_STAGES and not self.adapter_matches(ADAPTER_STAGES[stage]):
            return False
        return manifest.get("fingerprint") == fingerprint(self.config, stage)

    def require(self, stage: str, command: str) -> None:
        if not self.dir.is_dir():
            raise EmlocError(f"run directory {self.dir} does not exist: check the path or run `emloc run --out {self.dir}`")
        if not self.manifest_path(stage).exists():
            raise EmlocError(f"{self.dir} has no finished '{stage}' stage: run `emloc {command} --out {self.dir}` first")
        if not self.is_done(stage):
            raise EmlocError(f"the '{stage}' stage in {self.dir} was made with a different config or an older "
                             f"version: re-run `emloc {command} --out {self.dir}` or use a new --out")

    def begin(self, stage: str) -> None:
        """Forget a finished ``stage`` before rewriting its artifacts: an interrupted redo is never taken as done."""
        self.manifest_path(stage).unlink(missing_ok=True)

    def adapter_matches(self, which: str) -> bool:
        """Whether the adapter folder is the one this run's ``train`` stage wrote (not copied from another run)."""
        stage = "train_original" if which == "original" else "train_emulator"
        path = self.adapter_dir(which) / PROVENANCE
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return False
        return recorded == fingerprint(self.config, stage)

    def check_adapter(self, which: str) -> None:
        if not self.adapter_matches(which):
            raise EmlocError(f"adapter {self.adapter_dir(which)} does not belong to this run's model and emulator: "
                             f"re-run `emloc train --out {self.dir}` (and `emloc correct`)")

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
        report = io.read_csv(folder / "report.csv")
        names = list(report["module"])
        if sorted(f"{n}.{k}" for n in names for k in "uv") != sorted(tensors) or report.isna().any().any():
            raise EmlocError(f"{folder / 'report.csv'} is corrupted or truncated (it does not list the factored "
                             f"modules): re-run `emloc build --out {self.dir}`")
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
        return io.read_csv(self.dir / "correction" / "report.csv")

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
    features = run.features("calibration")  # bad data fails here, before anything is written
    run.begin("calibrate")
    run.save_config()
    stats, seconds = _timed(lambda: collect_statistics(run.model, features, run.config.emulator.target_modules,
                                                       run.tokenizer.pad_token_id, progress=run.progress))
    save_stats(run, stats, seconds)
    return stats


def save_stats(run: Run, stats: CalibrationStats, seconds: float) -> None:
    """Write the calibration artifacts (one atomic folder) and the 'calibrate' manifest."""
    with io.atomic_dir(run.dir / "calibration") as folder:
        io.write_tensors(folder / "stats.safetensors", stats.covariances)
        io.write_json(folder / "stats.json", {"input_of": stats.input_of, "token_counts": stats.token_counts,
                                             "n_samples": stats.n_samples})
    run.finish("calibrate", seconds, n_samples=stats.n_samples, distinct_inputs=len(stats.covariances))


def build(run: Run, stats: CalibrationStats | None = None) -> EmulatorFactors:
    """Stage 1b: low-rank factors, spectra and the per-layer report."""
    stats = stats or run.stats()
    run.begin("build")
    run.save_config()
    if run.structured:
        return _build_structured(run, stats)
    factors, seconds = _timed(lambda: build_factors(run.model, stats, run.config.emulator, progress=run.progress))
    save_emulator(run, lambda path: io.write_tensors(path, factor_tensors(factors.u, factors.v)), factors.spectra,
                  factors.report, factors.method, count_parameters(run.model), seconds)
    return factors


def factor_tensors(u: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The flat ``{"<module>.u": u, "<module>.v": v}`` layout of ``emulator/factors.safetensors``."""
    return {f"{n}.{k}": t for n in u for k, t in (("u", u[n]), ("v", v[n]))}


def save_emulator(run: Run, write_factors: Callable[[Path], None], spectra: dict, report: pd.DataFrame, method: str,
                  params_original: int, seconds: float) -> None:
    """Write the emulator folder whole (``write_factors(path)`` writes ``factors.safetensors``), then the manifest."""
    with io.atomic_dir(run.dir / "emulator") as folder:
        write_factors(folder / "factors.safetensors")
        io.write_tensors(folder / "spectra.safetensors", {f"{n}.{k}": t for n, d in spectra.items() for k, t in d.items()})
        report.to_csv(folder / "report.csv", index=False)
    saved = int((report["params_before"] - report["params_after"]).sum())
    run.finish("build", seconds, method=method, params_original=params_original,
               params_emulator=params_original - saved)


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
    features = run.features("train")
    if not any(label != IGNORE_INDEX for feature in features for label in feature["labels"][1:]):
        raise EmlocError(f"no training example keeps a response token within data.max_length = "
                         f"{run.config.data.max_length}: raise data.max_length")
    model = run.emulator() if which == "emulator" else run.fresh_model()
    run.begin(stage)
    run.save_config()
    result = train_lora(model, features, run.config.lora, run.config.emulator.target_modules,
                        run.tokenizer.pad_token_id, seed=run.config.seed, on_loss=on_loss, progress=run.progress)
    return save_training(run, which, result)


def save_training(run: Run, which: str, result, **extra) -> dict:
    """Write the adapter folder (with its provenance), the training summary and the 'train_<which>' manifest."""
    stage = f"train_{which}"
    check_finite_losses(result.history, which)
    with io.atomic_dir(run.adapter_dir(which)) as tmp:
        result.model.save_pretrained(tmp)
        io.write_json(tmp / PROVENANCE, {"stage": stage, "fingerprint": fingerprint(run.config, stage)})
    summary = {"which": which, "history": result.history, "seconds": result.seconds,
               "seconds_per_step": result.seconds_per_step, "trainable_parameters": _trainable(result.model),
               "model_parameters": count_parameters(result.model.get_base_model()) - _trainable(result.model), **extra}
    if which == "emulator" and run.structured:
        _save_recovered(run, result.model)
    io.write_json(run.dir / "training" / f"{ADAPTERS[which]}.json", summary)
    run.finish(f"train_{which}", result.seconds, **extra)
    return summary


def check_finite_losses(history: list, which: str) -> None:
    """A NaN or Inf training loss means the adapter is garbage: say so instead of saving it."""
    for step, loss in history:
        if not math.isfinite(loss):
            raise EmlocError(f"LoRA training on the {which} diverged (loss {loss} at step {step}): "
                             f"lower lora.learning_rate or check the data")


def _save_recovered(run: Run, trained) -> None:
    """The baseline's adapter zero filled / completed to the original model's shapes and keys."""
    cfg = run.config
    recovered = baselines.recover_adapter(trained, run.fresh_model(), cfg.lora, cfg.emulator.target_modules,
                                          cfg.seed, run.factors())
    with io.atomic_dir(run.adapter_dir("recovered")) as tmp:
        recovered.save_pretrained(tmp)
        io.write_json(tmp / PROVENANCE, {"stage": "train_emulator", "fingerprint": fingerprint(cfg, "train_emulator")})


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def correct(run: Run, factors: EmulatorFactors | None = None) -> pd.DataFrame:
    """Stage 3: correct the emulator-trained adapter for the original model; save it as a peft folder."""
    run.require("train_emulator", "train")
    run.check_adapter("emulator")
    run.begin("correct")
    run.save_config()
    if run.structured:
        run.finish("correct", 0.0, skipped=CORRECTION_SKIPPED)
        return pd.DataFrame()
    factors = factors or run.factors()
    start = time.perf_counter()
    peft_model = load_adapter(run.fresh_model(), run.adapter_dir("emulator"))
    method = run.config.correction.method
    stats = run.stats() if method == "activation_aware" else None
    report, tensors = correct_adapter(peft_model, factors, run.config.correction.clamp, method=method, stats=stats)
    seconds = time.perf_counter() - start
    with io.atomic_dir(run.adapter_dir("corrected")) as tmp:
        peft_model.save_pretrained(tmp)
        io.write_json(tmp / PROVENANCE, {"stage": "correct", "fingerprint": fingerprint(run.config, "train_emulator")})
    with io.atomic_dir(run.dir / "correction") as folder:
        io.write_tensors(folder / "subspace.safetensors", tensors)
        report.to_csv(folder / "report.csv", index=False)
    run.finish("correct", seconds, clamp=run.config.correction.clamp, method=method,
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


ADAPTER_OF = {"emulator_lora": "emulator", "transfer_uncorrected": "emulator", "transfer_corrected": "corrected",
              "full_lora": "original"}


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
    for variant in chosen:
        if variant in ADAPTER_OF:
            run.check_adapter(ADAPTER_OF[variant])
    run.begin("evaluate")
    run.save_config()
    cfg = run.config
    start = time.perf_counter()
    raw = evaluate_variants({v: (lambda v=v: _variant(loaders[v])) for v in chosen}, run.tokenizer, run.data,
                            cfg.data.max_length, cfg.evaluation.max_new_tokens, cfg.evaluation.batch_size, run.progress)
    seconds = time.perf_counter() - start
    build_manifest = io.read_json(run.manifest_path("build"))
    results = {
        "variants": {v: {"accuracy": r["accuracy"], "loss": r["loss"], "n": r["n"]} for v, r in raw.items()},
        "predictions": {v: r["predictions"] for v, r in raw.items()},
        "parameters": {"original": build_manifest["params_original"], "emulator": build_manifest["params_emulator"]},
        "config": cfg.to_dict(),
        "stage_seconds": run.stage_seconds() | {"evaluate": round(seconds, 2)},
        "notes": [CORRECTION_SKIPPED] if run.structured else [],
    }
    io.write_json(run.dir / "results.json", results)  # before the manifest: a finished manifest implies its results
    run.finish("evaluate", seconds)
    return results


def results_table(results: dict) -> pd.DataFrame:
    """The variants as a table: accuracy, loss, n."""
    return pd.DataFrame(results["variants"]).T.reindex([v for v in VARIANTS if v in results["variants"]])


def run_pipeline(run: Run, force: bool = False, on_loss: Callable[[str, int, float], None] | None = None) -> dict:
    """All stages in order, reusing finished ones whose config still matches (unless ``force``)."""
    if force and run.dir.exists():
        shutil.rmtree(run.dir / "manifests", ignore_errors=True)
    run.data  # bad data or settings fail here, before any compute
    check_lora_rank(run.model, run.config.lora, run.config.emulator.target_modules)
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
