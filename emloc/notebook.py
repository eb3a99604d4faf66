"""The run directory the notebooks share: each notebook reuses finished stages and computes the rest.

``notebook_run()`` opens ``runs/notebooks`` under the repository root (``$EMLOC_NOTEBOOK_RUN``
overrides it); ``ensure(run, "correct")`` runs whatever ``correct`` still needs, in order.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from emloc import pipeline
from emloc.config import DIFFUSION_MODELS, PRESETS, RunConfig, merge_dicts
from emloc.errors import EmlocError


def notebook_run_dir() -> Path:
    """``$EMLOC_NOTEBOOK_RUN``, else ``runs/notebooks`` in the repository (the current folder if not a
    checkout)."""
    if os.environ.get("EMLOC_NOTEBOOK_RUN"):
        return Path(os.environ["EMLOC_NOTEBOOK_RUN"]).expanduser()
    root = Path(__file__).resolve().parents[1]
    return (root if (root / "pyproject.toml").exists() else Path.cwd()) / "runs" / "notebooks"


def notebook_run(preset: str = "quick", directory: str | Path | None = None, **overrides) -> pipeline.Run:
    """A :class:`~emloc.pipeline.Run` on the shared notebook directory with ``preset`` sizes
    (+ ``overrides``).

    ``$EMLOC_NOTEBOOK_MODEL`` replaces the default model (e.g. a workshop's own model folder).
    """
    if preset not in PRESETS:
        raise EmlocError(f"preset {preset!r} is unknown: use one of {', '.join(PRESETS)}")
    model = {"model": os.environ["EMLOC_NOTEBOOK_MODEL"]} if os.environ.get("EMLOC_NOTEBOOK_MODEL") else {}
    config = RunConfig.from_dict(merge_dicts(merge_dicts(PRESETS[preset], model), overrides))
    return pipeline.Run(directory or notebook_run_dir(), config)


def denoiser_model() -> str:
    """The denoiser notebook 08 runs: ``$EMLOC_NOTEBOOK_DENOISER`` if set, else ``digits-dit`` once it is
    pretrained (``emloc denoiser``, minutes, once), else the few-step ``digits-dit-tiny`` (its samples are
    noise: it shows the machinery, not the method)."""
    from emloc.denoiser import DENOISER_FILE, denoiser_dir
    chosen = os.environ.get("EMLOC_NOTEBOOK_DENOISER")
    if chosen:
        if chosen not in DIFFUSION_MODELS:
            raise EmlocError(f"EMLOC_NOTEBOOK_DENOISER = {chosen!r} is not a built-in denoiser: use "
                             f"{' or '.join(DIFFUSION_MODELS)}")
        return chosen
    return "digits-dit" if (denoiser_dir("standard", 0) / DENOISER_FILE).exists() else "digits-dit-tiny"


def denoiser_run(ratio: float = 0.5, **overrides) -> pipeline.Run:
    """A DreamBooth run of :func:`denoiser_model` at emulator ratio ``ratio`` (``overrides``: RunConfig
    sections), in its own folder beside the shared notebook run (one per model and ratio)."""
    model = denoiser_model()
    config = RunConfig.from_dict(merge_dicts({"model": model, "emulator": {"ratio": ratio}}, overrides))
    return pipeline.Run(notebook_run_dir().parent / f"dreambooth_{model}_ratio{ratio:g}", config)


def ensure(run: pipeline.Run, stage: str,
           on_loss: Callable[[str, int, float], None] | None = None) -> list[str]:
    """Run ``stage`` and the stages it needs (:data:`emloc.stages.STAGES`) that are not finished for this
    config, in order, saying which are reused and which computed; returns those run
    (:func:`emloc.pipeline.run_stages`, the loop ``emloc run`` uses too).

    ``on_loss(which, step, loss)`` receives the training losses (a training monitor's ``on_loss``).
    """
    return pipeline.run_stages(run, stage, on_loss, verbose=True)


def benchmark_results() -> Path:
    """``benchmarks/results`` of the repository: beside the notebook's folder, its parent, or where emloc
    lives (a notebook copy run elsewhere); a one-line error when none has it."""
    candidates = (Path.cwd(), Path.cwd().parent, Path(__file__).resolve().parents[1])
    found = next((p / "benchmarks" / "results" for p in candidates
                  if (p / "benchmarks" / "results").is_dir()), None)
    if found is None:
        raise EmlocError("benchmarks/results was not found: open the notebook from the repository's "
                         "notebooks/ folder")
    return found
