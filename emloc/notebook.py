"""The run directory the notebooks share: each notebook reuses finished stages and computes the rest.

``notebook_run()`` opens ``runs/notebooks`` under the repository root (``$EMLOC_NOTEBOOK_RUN``
overrides it); ``ensure(run, "correct")`` runs whatever ``correct`` still needs, in order.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from emloc import pipeline
from emloc.config import PRESETS, RunConfig, merge_dicts
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
