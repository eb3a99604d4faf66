"""The run directory: its config, stage manifests and fingerprints, and every artifact's reader and writer.

Layout (each folder written atomically, a stage's ``manifests/<stage>.json`` last)::

    config.yaml  manifests/<stage>.json
    calibration/  stats.safetensors stats.json                      (calibrate)
    emulator/     factors.safetensors spectra.safetensors report.csv  (build; baselines: structured.json,
                                                                       indices)
    adapters/<emulator_lora|full_lora|corrected|recovered_lora>/      (peft folders + emloc_provenance.json)
    training/<adapter>.json                                           (train_*)
    correction/   subspace.safetensors report.csv                     (correct)
    results.json                                                      (evaluate)

A stage's manifest records a fingerprint of the config sections it depends on (listed in
:data:`emloc.stages.STAGES`); a finished stage whose fingerprint still matches counts as done.
A passive store: it reads and writes finished data (tensors, tables, adapter folders, manifests, a sweep
point's ``point.json``) and answers "is this stage done and still valid"; it loads no model and computes
nothing. Orchestration (the stage functions, loading models) lives in :mod:`emloc.pipeline`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from emloc import io
from emloc.calibration import CalibrationStats
from emloc.config import RunConfig, applicable
from emloc.svd_emulator import count_parameters
from emloc.emulator_kinds import Emulator, emulator_kind, factor_tensors, write_factor_folder
from emloc.errors import EmlocError
from emloc.precision import fingerprint_part
from emloc.stages import STAGE, STAGES, Stage

__all__ = ["FORMAT_VERSION", "ADAPTERS", "ADAPTER_STAGES", "CORRECTION_SKIPPED", "PROVENANCE", "RunDir",
           "fingerprint", "fingerprint_parts", "factor_tensors", "save_stats", "save_emulator",
           "save_built_emulator", "save_training", "check_finite_losses", "save_correction", "save_fidelity",
           "save_results"]

FORMAT_VERSION = 1
ADAPTERS = {"emulator": "emulator_lora", "original": "full_lora", "corrected": "corrected",
            "recovered": "recovered_lora"}
"""Adapter key -> folder under ``adapters/``. ``recovered``: a baseline emulator's adapter in the original
shapes."""
ADAPTER_STAGES = {stage.name: stage.adapter for stage in STAGES if stage.adapter}
CORRECTION_SKIPPED = "correction skipped: it applies to SVD emulators only (layer_drop/prune have no W')"
PROVENANCE = "emloc_provenance.json"


# ---- fingerprints ------------------------------------------------------------------------------

SEQUENTIAL_ONLY = ("sequential_damping",)
"""Emulator options that only sequential calibration reads: left out of independent runs' fingerprints, so
adding one keeps every finished independent stage valid."""


DATA_FILE_ONLY = ("keep_duplicates",)
"""Data options that only a user's data file reads: left out of built-in tasks' fingerprints (their splits
have no duplicates), so adding one keeps every finished built-in-task stage valid."""


def _stage_parts(c: dict, stage: Stage) -> dict:
    c = applicable(c)  # a language model's fingerprints leave the dreambooth section out
    c = c | {"lora": fingerprint_part(c["lora"], c["device"])}  # 32-true left out; auto resolved
    if c["emulator"].get("calibration") != "sequential":
        c = c | {"emulator": {k: v for k, v in c["emulator"].items() if k not in SEQUENTIAL_ONLY}}
    elif c["emulator"].get("sequential_damping", 0) > 0:
        # damped builds truncate under C~ + delta I since issue 24: older damped factors are not reused
        c = c | {"emulator": c["emulator"] | {"damped_truncation": "exact"}}
    if not c["data"].get("path"):
        c = c | {"data": {k: v for k, v in c["data"].items() if k not in DATA_FILE_ONLY}}
    if stage.config is None:
        return c
    data = (c["data"] if stage.uses_calibration
            else {k: v for k, v in c["data"].items() if k != "n_calibration"})
    base = ({k: c[k] for k in ("model", "dtype", "seed")}
            | {"data": data, "targets": c["emulator"]["target_modules"]}
            | ({"dreambooth": c["dreambooth"]} if "dreambooth" in c else {}))
    return base | {section: c[section] for section in stage.config}


def fingerprint_parts(config: RunConfig) -> dict[str, dict]:
    """stage -> the config parts its fingerprint hashes."""
    c = config.to_dict()
    return {stage.name: _stage_parts(c, stage) for stage in STAGES}


def fingerprint(config: RunConfig, stage: str) -> str:
    parts = _stage_parts(config.to_dict(), STAGE[stage])
    text = json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _provenance_stage(which: str) -> str:
    """The stage whose fingerprint an adapter's provenance records (the corrected adapter: its source's)."""
    return "train_original" if which == "original" else "train_emulator"


# ---- the directory ------------------------------------------------------------------------------

class RunDir:
    """A run directory with its config: manifests, fingerprints and the artifacts on disk (no models)."""

    def __init__(self, directory: str | Path, config: RunConfig | None = None):
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise EmlocError(f"run directory {self.dir} is a file: give --out a folder path")
        self.config = config or self._stored_config()

    def _stored_config(self) -> RunConfig:
        path = self.dir / "config.yaml"
        if not path.exists():
            return RunConfig()
        try:
            return RunConfig.from_dict(io.read_yaml(path))
        except EmlocError as error:
            raise EmlocError(f"{path} (from an older or different run): {error}; "
                             "fix it or use a new run directory") from None

    def save_config(self) -> None:
        io.write_yaml(self.dir / "config.yaml", self.config.to_dict())

    # ---- manifests ----
    def manifest_path(self, stage: str) -> Path:
        return self.dir / "manifests" / f"{stage}.json"

    def _manifest(self, stage: str) -> dict | None:
        """``stage``'s manifest, or ``None`` when it is missing or garbled (an unfinished stage)."""
        try:
            manifest = json.loads(self.manifest_path(stage).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, not UTF-8, not JSON
            return None
        return manifest if isinstance(manifest, dict) else None

    def is_done(self, stage: str) -> bool:
        manifest = self._manifest(stage)
        if manifest is None:
            return False
        if stage in ADAPTER_STAGES and not self.adapter_matches(ADAPTER_STAGES[stage]):
            return False
        if not manifest.get("complete", True):  # an evaluation of some variants only (a sweep's)
            return False
        return (manifest.get("fingerprint") == fingerprint(self.config, stage)
                and not self._redone_since(stage))

    def _redone_since(self, stage: str) -> bool:
        """Whether a stage ``stage`` needs finished after it (e.g. ``emloc train`` again after
        ``evaluate``): its result is then stale, as in make. Copies that reset file times only cause a
        redo, never a stale reuse."""
        mine = self.manifest_path(stage).stat().st_mtime_ns
        needed = (self.manifest_path(need) for need in STAGE[stage].needs)
        return any(path.exists() and path.stat().st_mtime_ns > mine for path in needed)

    def stage_fingerprint(self, stage: str) -> str | None:
        """The fingerprint ``stage``'s manifest records (``None``: not finished, or a garbled manifest)."""
        manifest = self._manifest(stage)
        return None if manifest is None else manifest.get("fingerprint")

    def adopt_stage(self, stage: str, donor: "RunDir") -> None:
        """Hard-link ``stage``'s artifacts and manifest from ``donor`` (a run that finished it with the same
        fingerprint), replacing this run's copies."""
        for relative in (*STAGE[stage].paths, f"manifests/{stage}.json"):
            if (donor.dir / relative).exists():
                _link(donor.dir / relative, self.dir / relative)

    # ---- a sweep point's record ----
    def read_point(self) -> dict | None:
        """``point.json`` (per-variant results and per-item correctness of a sweep point), if written."""
        path = self.dir / "point.json"
        return io.read_json(path) if path.exists() else None

    def write_point(self, record: dict) -> None:
        io.write_json(self.dir / "point.json", record)

    def require(self, stage: str, command: str | None = None) -> None:
        """Raise unless ``stage`` is finished for this config; ``command`` (default: the stage's) makes it."""
        command = command or STAGE[stage].command
        if not self.dir.is_dir():
            raise EmlocError(f"run directory {self.dir} does not exist: "
                             f"check the path or run `emloc run --out {self.dir}`")
        if not self.manifest_path(stage).exists():
            raise EmlocError(f"{self.dir} has no finished '{stage}' stage: "
                             f"run `emloc {command} --out {self.dir}` first")
        if not self.is_done(stage):
            raise EmlocError(f"the '{stage}' stage in {self.dir} was made with a different config or an "
                             f"older version: re-run `emloc {command} --out {self.dir}` or use a new --out")

    def begin(self, stage: str) -> None:
        """Forget a finished ``stage`` before rewriting its artifacts: an interrupted redo is never taken as
        done."""
        self.manifest_path(stage).unlink(missing_ok=True)

    def finish(self, stage: str, seconds: float, **extra) -> None:
        io.write_json(self.manifest_path(stage),
                      {"stage": stage, "fingerprint": fingerprint(self.config, stage),
                       "format_version": FORMAT_VERSION, "seconds": seconds, **extra})

    def build_manifest(self) -> dict:
        return io.read_json(self.manifest_path("build"))

    def stage_seconds(self) -> dict[str, float]:
        out = {}
        for path in sorted((self.dir / "manifests").glob("*.json")):
            out[path.stem] = round(io.read_json(path).get("seconds", 0.0), 2)
        return out

    # ---- adapters ----
    def adapter_dir(self, which: str) -> Path:
        return self.dir / "adapters" / ADAPTERS[which]

    def adapter_matches(self, which: str) -> bool:
        """Whether the adapter folder is the one this run's ``train`` stage wrote (not copied from another
        run)."""
        path = self.adapter_dir(which) / PROVENANCE
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return False
        return recorded == fingerprint(self.config, _provenance_stage(which))

    def check_adapter(self, which: str) -> None:
        if not self.adapter_matches(which):
            raise EmlocError(f"adapter {self.adapter_dir(which)} does not belong to this run's model and "
                             f"emulator: re-run `emloc train --out {self.dir}` (and `emloc correct`)")

    # ---- artifacts ----
    @property
    def emulator_kind(self) -> type:
        """The :class:`~emloc.emulator_kinds.Emulator` class of this config's ``emulator.method``."""
        return emulator_kind(self.config.emulator.method)

    @property
    def structured(self) -> bool:
        """True for the layer-drop and pruning baselines (no low-rank factors, no correction)."""
        return not self.emulator_kind.corrects

    def stats(self) -> CalibrationStats:
        self.require("calibrate")
        meta = io.read_json(self.dir / "calibration" / "stats.json")
        covariances = io.read_tensors(self.dir / "calibration" / "stats.safetensors")
        return CalibrationStats(covariances, meta["input_of"], meta["token_counts"], meta["n_samples"])

    def factors(self) -> Emulator:
        """The built emulator: :class:`~emloc.emulator_kinds.SvdEmulator` factors or a structured baseline."""
        self.require("build")
        method = self.build_manifest().get("method", "activation_aware")
        return self.emulator_kind.load(self.dir / "emulator", method)

    def history(self, which: str) -> dict:
        return io.read_json(self.dir / "training" / f"{ADAPTERS[which]}.json")

    def correction_report(self) -> pd.DataFrame:
        self.require("correct")
        return io.read_csv(self.dir / "correction" / "report.csv")

    def correction_tensors(self) -> dict[str, torch.Tensor]:
        self.require("correct")
        return io.read_tensors(self.dir / "correction" / "subspace.safetensors")

    def fidelity(self) -> dict:
        """The emulator's end-to-end fidelity: a language model's KL and residual drift
        (:func:`emloc.fidelity.fidelity_report`), a denoiser's noise-prediction error
        (:func:`emloc.denoiser.noise_prediction_error`)."""
        self.require("fidelity")
        path = self.dir / "fidelity.json"
        report = io.read_json(path)
        known = isinstance(report, dict) and ({"kl", "drift"} <= set(report)
                                              or bool({"relative_error", "skipped"} & set(report)))
        if not known:
            raise EmlocError(f"{path} is not a fidelity report (no 'kl' and 'drift', no 'relative_error'): "
                             f"delete it and re-run `emloc fidelity --out {self.dir}`")
        return report

    def results(self) -> dict:
        self.require("evaluate")
        return io.read_json(self.dir / "results.json")


def _link(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=os.link)
    else:
        os.link(source, target)


# ---- writers: each writes its folder whole, then the stage's manifest ----------------------------

def save_stats(run: RunDir, stats: CalibrationStats, seconds: float, data_report: dict | None = None) -> None:
    """Write the calibration artifacts (one atomic folder) and the 'calibrate' manifest; ``data_report``: the
    data's duplicate, overlap and truncation counts."""
    with io.atomic_dir(run.dir / "calibration") as folder:
        io.write_tensors(folder / "stats.safetensors", stats.covariances)
        io.write_json(folder / "stats.json", {"input_of": stats.input_of, "token_counts": stats.token_counts,
                                             "n_samples": stats.n_samples, "data": data_report or {}})
    run.finish("calibrate", seconds, n_samples=stats.n_samples, distinct_inputs=len(stats.covariances))


def save_emulator(run: RunDir, write_factors: Callable[[Path], None], spectra: dict, report: pd.DataFrame,
                  method: str, params_original: int, seconds: float) -> None:
    """Write an SVD emulator's folder whole (``write_factors(path)`` writes ``factors.safetensors``), then the
    manifest (for factors that never sit in memory at once, e.g. streamed layer by layer)."""
    with io.atomic_dir(run.dir / "emulator") as folder:
        write_factor_folder(folder, write_factors, spectra, report)
    saved = int((report["params_before"] - report["params_after"]).sum())
    run.finish("build", seconds, method=method, params_original=params_original,
               params_emulator=params_original - saved)


def save_built_emulator(run: RunDir, emulator: Emulator, params_original: int, params_emulator: int,
                        seconds: float) -> None:
    """Write any emulator's folder whole, then the 'build' manifest with both parameter counts."""
    with io.atomic_dir(run.dir / "emulator") as folder:
        emulator.save(folder)
    run.finish("build", seconds, method=emulator.method, params_original=params_original,
               params_emulator=params_emulator)


def _save_adapter(run: RunDir, which: str, peft_model, stage: str) -> None:
    """A peft adapter folder with its provenance (the fingerprint that ties it to this run)."""
    with io.atomic_dir(run.adapter_dir(which)) as tmp:
        peft_model.save_pretrained(tmp)
        io.write_json(tmp / PROVENANCE,
                      {"stage": stage, "fingerprint": fingerprint(run.config, _provenance_stage(which))})


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_finite_losses(history: list, which: str) -> None:
    """A NaN or Inf training loss means the adapter is garbage: say so instead of saving it."""
    for step, loss in history:
        if not math.isfinite(loss):
            raise EmlocError(f"LoRA training on the {which} diverged (loss {loss} at step {step}): "
                             f"lower lora.learning_rate or check the data")


def save_training(run: RunDir, which: str, result, recovered=None, **extra) -> dict:
    """Write the adapter folder (with its provenance), the training summary and the 'train_<which>' manifest.

    ``recovered``: a baseline emulator's adapter in the original model's shapes (``adapters/recovered_lora``).
    """
    stage = f"train_{which}"
    _save_adapter(run, which, result.model, stage)
    summary = {"which": which, "history": result.history, "seconds": result.seconds,
               "seconds_per_step": result.seconds_per_step, "trainable_parameters": _trainable(result.model),
               "model_parameters": count_parameters(result.model.get_base_model()) - _trainable(result.model),
               "precision": result.precision, **extra}
    if recovered is not None:
        _save_adapter(run, run.emulator_kind.transfer_adapter, recovered, stage)
    io.write_json(run.dir / "training" / f"{ADAPTERS[which]}.json", summary)
    run.finish(stage, result.seconds, **extra)
    return summary


def save_correction(run: RunDir, peft_model, report: pd.DataFrame, tensors: dict[str, torch.Tensor],
                    seconds: float) -> None:
    """Write the corrected adapter, the correction's subspace tensors and report, then the 'correct'
    manifest."""
    _save_adapter(run, "corrected", peft_model, "correct")
    with io.atomic_dir(run.dir / "correction") as folder:
        io.write_tensors(folder / "subspace.safetensors", tensors)
        report.to_csv(folder / "report.csv", index=False)
    run.finish("correct", seconds, clamp=run.config.correction.clamp, method=run.config.correction.method,
               modules_clamped=int((report["clamped_columns"] > 0).sum()), modules=len(report))


def save_fidelity(run: RunDir, report: dict, seconds: float) -> None:
    """``fidelity.json`` before the 'fidelity' manifest."""
    io.write_json(run.dir / "fidelity.json", report)
    run.finish("fidelity", seconds, skipped=report.get("skipped"))


def save_results(run: RunDir, results: dict, seconds: float, complete: bool = True) -> None:
    """``results.json`` before the manifest: a finished manifest implies its results. ``complete=False`` (some
    variants only, as a sweep asks) keeps the stage unfinished for :meth:`RunDir.is_done`."""
    io.write_json(run.dir / "results.json", results)
    run.finish("evaluate", seconds, **({} if complete else {"complete": False}))
