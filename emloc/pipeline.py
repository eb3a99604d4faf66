"""The stage functions (calibrate -> build -> fidelity -> train -> correct -> evaluate) and the one loop
over them.

Every stage reads the previous stage's artifacts from the run directory (:mod:`emloc.rundir`), computes, and
hands its finished results to the run directory's writers (atomic folders, the manifest last), so any stage
can resume from a finished one. The stages, what they need and what their fingerprints cover are listed
once in :data:`emloc.stages.STAGES`; :data:`STAGE_FUNCTIONS` maps their names to the functions here, and
:func:`run_stages` is the loop that ``emloc run``, :func:`emloc.notebook.ensure` and the sweeps all use.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable

import pandas as pd

from emloc.calibration import CalibrationStats, target_linears
from emloc.config import RunConfig
from emloc.correction import correct_adapter
from emloc.data import TaskData, count_truncated, encode_examples, hygiene_line
from emloc.svd_emulator import count_parameters, load_emulator_lean
from emloc.emulator_kinds import Emulator, as_emulator
from emloc.errors import EmlocError
from emloc.allocation import allocate
from emloc.sequential import build_sequential
from emloc.lora import LossCallback, check_lora_rank, load_adapter
from emloc.families import last_block_output
from emloc.model_tasks import task_for
from emloc.models import load_tokenizer, resolve_device, resolve_model_path
from emloc.rundir import (CORRECTION_SKIPPED, RunDir, check_finite_losses, save_built_emulator,
                          save_correction, save_fidelity, save_results, save_stats, save_training)
from emloc.targets import excluded_modules, targeting_summary
from emloc.stages import STAGES, VARIANT, VARIANT_NAMES, VARIANT_SPECS, evaluated, with_needs

VARIANTS = VARIANT_NAMES
"""The six evaluated variants, in table order (see :data:`emloc.stages.VARIANT_SPECS`)."""


class Run(RunDir):
    """A run directory with its config (:class:`~emloc.rundir.RunDir`: manifests and artifacts) plus the
    inputs the stages load once: tokenizer, task data and the original model."""

    def __init__(self, directory, config: RunConfig | None = None, progress: bool = True):
        super().__init__(directory, config)
        self.task = task_for(self.config)
        """What differs between kinds of model (:mod:`emloc.model_tasks`)."""
        self.config = self.task.resolve_targets(self.config)
        self.progress = progress
        self.device = resolve_device(self.config.device)
        self._tokenizer = None
        self._data: TaskData | None = None
        self._features: dict[str, list[dict]] = {}
        self._model = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.model, self.config.trust_remote_code)
        return self._tokenizer

    @property
    def data(self):
        """The task data (:class:`~emloc.data.TaskData`; a denoiser's DreamBooth images), loaded once."""
        if self._data is None:
            self._data = self.task.data(self)
        return self._data

    def data_report(self) -> dict:
        """The data's duplicate and test-overlap counts (user files) and how many records are longer than
        ``data.max_length`` (cut); printed as one line when any is non-zero."""
        cfg = self.config.data
        report = {"duplicates": 0, "test_overlap": 0, "removed": True} | self.data.source.get("hygiene", {})
        report |= {"truncated": count_truncated(self.tokenizer, self.data.task,
                                                self.data.train + self.data.test, cfg.max_length),
                   "max_length": cfg.max_length}
        line = hygiene_line(report)
        if line:
            print(line, flush=True)
        return report

    def features(self, split: str) -> list[dict]:
        """The tokenized examples of ``split`` (``train``, ``calibration`` or ``test``), encoded once per run
        (planning, the checks before training and training itself read the same list; nobody mutates it)."""
        if split not in self._features:
            self._features[split] = encode_examples(self.tokenizer, self.data.task, getattr(self.data, split),
                                                    self.config.data.max_length)
        return self._features[split]

    def fresh_model(self):
        """A newly loaded original model (stages that wrap it with LoRA must not share it)."""
        return self.task.load_model(self)

    @property
    def model(self):
        """The original model, loaded once and never modified."""
        if self._model is None:
            self._model = self.fresh_model()
        return self._model

    def emulator(self, factors: Emulator | None = None):
        """A fresh emulator model (original architecture with low-rank layers, or a baseline's)."""
        return as_emulator(factors or self.factors()).apply(self.fresh_model())

    def lean_emulator(self):
        """The emulator for training, never holding the original (:func:`lean_emulator_for_training`)."""
        return lean_emulator_for_training(self)


def targeting_line(run: Run) -> str:
    """The one line a run prints about what its emulator targets (module types, counts, kept dense)."""
    cfg = run.config.emulator
    linears = target_linears(run.model, cfg.target_modules)
    kept = set() if run.structured else excluded_modules(linears, cfg, last_block_output(run.model))
    return targeting_summary(linears, kept)


def _timed(function: Callable) -> tuple:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


# ---- stages ----------------------------------------------------------------------------------

def calibrate(run: Run) -> CalibrationStats:
    """Stage 1a: ``C`` per distinct linear input on the calibration samples."""
    inputs = run.task.calibration_inputs(run)  # bad data fails here, before anything is written
    run.begin("calibrate")
    run.save_config()
    print(targeting_line(run), flush=True)
    stats, seconds = _timed(lambda: run.task.calibration_stats(run, inputs))
    save_stats(run, stats, seconds, run.task.data_report(run))
    return stats


def build(run: Run, stats: CalibrationStats | None = None) -> Emulator:
    """Stage 1b: the emulator of ``emulator.method`` (low-rank factors, spectra and the per-layer report,
    or a structured baseline)."""
    stats = stats or run.stats()
    run.begin("build")
    run.save_config()
    emulator, seconds = _timed(lambda: _build_emulator(run, stats))
    params_original = count_parameters(run.model)
    save_built_emulator(run, emulator, params_original, emulator.parameters(params_original, run.fresh_model),
                        seconds)
    return emulator


def _build_emulator(run: Run, stats: CalibrationStats) -> Emulator:
    """Independent calibration: from the saved ``C``; sequential: layer by layer on the calibration samples
    (ranks from the global allocation of the independent statistics when asked)."""
    cfg = run.config.emulator
    if cfg.calibration != "sequential":
        return run.emulator_kind.build(run.model, stats, cfg, progress=run.progress)
    ranks, uniform = (allocate(run.model, stats, cfg, run.progress) if cfg.allocation == "global"
                      else (None, None))
    factors, _ = build_sequential(run.model, run.features("calibration"), cfg, run.tokenizer.pad_token_id,
                                  progress=run.progress, ranks=ranks)
    if uniform is not None:
        factors.report["rank_uniform"] = factors.report["module"].map(uniform)
    return as_emulator(factors)


def fidelity(run: Run) -> dict:
    """The emulator (no adapter) against the original on the held-out examples: per-token KL of the next-token
    distributions and the residual stream's relative error after every decoder layer; ``fidelity.json``."""
    run.require("build", "build")
    run.begin("fidelity")
    run.save_config()
    if run.config.emulator.method == "layer_drop":  # fewer decoder layers: no layer-by-layer comparison
        save_fidelity(run, {"skipped": "the layer-drop emulator has fewer decoder layers than the original"},
                      0.0)
        return run.fidelity()
    report, seconds = _timed(lambda: run.task.fidelity(run))
    save_fidelity(run, report, seconds)
    return report


def train(run: Run, which: str = "emulator", on_loss: LossCallback | None = None) -> dict:
    """Stage 2: LoRA on the emulator (``which='emulator'``) or on the original model (``'original'``)."""
    if which not in ("emulator", "original"):
        raise EmlocError(f"cannot train on {which!r}: use 'emulator' or 'original'")
    stage = f"train_{which}"
    model = run.task.model_for_training(run, which)  # bad data fails here, before anything is written
    run.begin(stage)
    run.save_config()
    result = run.task.train(run, model, on_loss)
    check_finite_losses(result.history, which)
    return save_training(run, which, result, recovered_adapter(run, which, result.model))


def recovered_adapter(run: Run, which: str, peft_model):
    """A baseline emulator's adapter in the original model's shapes (``None`` for SVD emulators, whose adapter
    fits the original as it is)."""
    if which != "emulator" or run.emulator_kind.transfer_adapter == "emulator":
        return None
    cfg = run.config
    return run.factors().recover_adapter(peft_model, run.fresh_model(), cfg.lora, cfg.emulator.target_modules,
                                         cfg.seed)


def lean_emulator_for_training(run: Run):
    """The model ``emloc train --on emulator`` trains, loaded without ever holding the original model.

    SVD emulators come from :func:`emloc.svd_emulator.load_emulator_lean` (the original's targeted weights are
    never read); the structured baselines (layer drop, prune), models without safetensors files and
    checkpoints whose tensor names differ from the model's fall back to ``run.emulator()``, which loads the
    original first.
    """
    cfg = run.config
    folder = Path(resolve_model_path(cfg.model))
    if run.structured or not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return run.emulator()
    try:
        return load_emulator_lean(cfg.model, run.factors(), cfg.dtype, cfg.trust_remote_code).to(run.device)
    except EmlocError as error:  # e.g. a checkpoint whose names transformers renames on load (GPT-NeoX)
        print(f"train: {error}; loading the original first instead (more memory)", flush=True)
        return run.emulator()


def correct(run: Run, factors: Emulator | None = None) -> pd.DataFrame:
    """Stage 3: correct the emulator-trained adapter for the original model; save it as a peft folder."""
    run.require("train_emulator", "train")
    run.check_adapter("emulator")
    run.begin("correct")
    run.save_config()
    if not run.emulator_kind.corrects:
        run.finish("correct", 0.0, skipped=CORRECTION_SKIPPED)
        return pd.DataFrame()
    factors = factors or run.factors()
    start = time.perf_counter()
    peft_model = load_adapter(run.fresh_model(), run.adapter_dir("emulator"))
    method = run.config.correction.method
    stats = run.stats() if method == "activation_aware" else None
    report, tensors = correct_adapter(peft_model, factors, run.config.correction.clamp, method=method,
                                      stats=stats)
    save_correction(run, peft_model, report, tensors, time.perf_counter() - start)
    return report


@contextlib.contextmanager
def _variant(load: Callable):
    model = load()
    try:
        yield model
    finally:
        del model


def variant_loaders(run: Run, factors: Emulator) -> dict[str, Callable]:
    """name -> loader of the model for each evaluated variant (:data:`emloc.stages.VARIANT_SPECS`)."""
    emulator = as_emulator(factors)

    def loader(variant) -> Callable:
        if variant.adapter is None:
            return (lambda: run.emulator(emulator)) if variant.on_emulator else (lambda: run.model)
        if variant.on_emulator:
            return lambda: load_adapter(run.emulator(emulator), run.adapter_dir(variant.adapter))
        # the emulator-trained adapter reaches the original model through the emulator's transfer adapter
        adapter = emulator.transfer_adapter if variant.adapter == "emulator" else variant.adapter
        return lambda: load_adapter(run.fresh_model(), run.adapter_dir(adapter))

    return {variant.name: loader(variant) for variant in VARIANT_SPECS}


def evaluate(run: Run, variants: list[str] | None = None) -> dict:
    """Evaluate the variants (default: every one whose stage is finished) on the test split; write
    ``results.json``."""
    run.require("build", "build")
    factors = run.factors()
    loaders = variant_loaders(run, factors)
    unknown = [v for v in variants or [] if v not in VARIANT]
    if unknown:
        raise EmlocError(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANT_NAMES)}")
    chosen = variants or [v.name for v in VARIANT_SPECS if v.adapter is None or run.is_done(v.stage)]
    chosen = evaluated(chosen, factors.corrects)
    for variant in chosen:
        if VARIANT[variant].adapter:
            run.check_adapter(VARIANT[variant].adapter)
    run.begin("evaluate")
    run.save_config()
    cfg = run.config
    start = time.perf_counter()
    metrics, extra = run.task.evaluate(run, {v: (lambda v=v: _variant(loaders[v])) for v in chosen})
    seconds = time.perf_counter() - start
    build_manifest = run.build_manifest()
    results = {
        "variants": metrics,
        **extra,
        "parameters": {"original": build_manifest["params_original"],
                       "emulator": build_manifest["params_emulator"]},
        "config": cfg.to_dict(),
        "stage_seconds": run.stage_seconds() | {"evaluate": round(seconds, 2)},
        "notes": [] if factors.corrects else [CORRECTION_SKIPPED],
    }
    save_results(run, results, seconds, complete=variants is None)
    return results


def results_table(results: dict) -> pd.DataFrame:
    """The variants as a table: accuracy, loss, n."""
    return pd.DataFrame(results["variants"]).T.reindex([v for v in VARIANTS if v in results["variants"]])


STAGE_FUNCTIONS: dict[str, Callable] = {
    "calibrate": lambda run, on_loss=None: calibrate(run),
    "build": lambda run, on_loss=None: build(run),
    "fidelity": lambda run, on_loss=None: fidelity(run),
    "train_emulator": lambda run, on_loss=None: train(run, "emulator", _tagged(on_loss, "emulator")),
    "train_original": lambda run, on_loss=None: train(run, "original", _tagged(on_loss, "original")),
    "correct": lambda run, on_loss=None: correct(run),
    "evaluate": lambda run, on_loss=None: evaluate(run),
}
"""Stage name (:data:`emloc.stages.STAGES`) -> ``function(run, on_loss=None)``."""


def _tagged(on_loss: Callable[[str, int, float], None] | None, which: str) -> LossCallback | None:
    """``on_loss(which, step, loss)`` -> the ``on_loss(step, loss)`` that :func:`train` calls."""
    return None if on_loss is None else (lambda step, loss: on_loss(which, step, loss))


def run_stages(run: Run, until: str | list[str] | None = None,
               on_loss: Callable[[str, int, float], None] | None = None, verbose: bool = False) -> list[str]:
    """Run, in registry order, the stages that ``until`` needs (and ``until``; default: every stage), skipping
    those the run directory reports done and still valid for the config; returns the stages run.

    The one rule, for every caller: a stage is redone when it is not done and valid (:meth:`RunDir.is_done`:
    its manifest's fingerprint matches the config and no stage it needs finished after it), or when a stage it
    needs was redone in this call. ``on_loss(which, step, loss)`` receives the training
    losses; ``verbose`` prints a line per stage (reused, or computed and how long it took).
    """
    wanted = with_needs([until] if isinstance(until, str) else until) if until else list(STAGES)
    ran: list[str] = []
    for stage in wanted:
        if run.is_done(stage.name) and not set(stage.needs) & set(ran):
            if verbose:
                print(f"{stage.name}: reusing the finished stage in {run.dir}", flush=True)
            continue
        if verbose:
            print(f"{stage.name}: computing ...", flush=True)
        start = time.perf_counter()
        STAGE_FUNCTIONS[stage.name](run, on_loss)
        if verbose:
            print(f"{stage.name}: done in {time.perf_counter() - start:.1f} s", flush=True)
        ran.append(stage.name)
    return ran


def run_pipeline(run: Run, force: bool = False,
                 on_loss: Callable[[str, int, float], None] | None = None) -> dict:
    """Every stage of :data:`emloc.stages.STAGES` through :func:`run_stages` (``force``: redo them all);
    returns the results. ``on_loss(which, step, loss)`` receives the training losses."""
    if force and run.dir.exists():
        shutil.rmtree(run.dir / "manifests", ignore_errors=True)
    run.task.check_data(run)  # bad data or settings fail here, before any compute
    check_lora_rank(run.model, run.config.lora, run.config.emulator.target_modules)
    run_stages(run, on_loss=on_loss)
    return run.results()
