"""EMLoC: emulator-based memory-efficient fine-tuning with LoRA correction.

Stages: :func:`calibrate` -> :func:`build` -> :func:`train` -> :func:`correct` -> :func:`evaluate`,
each reading and writing one :class:`Run` directory (the stages are listed once in :data:`STAGES`).
The names below are imported on first use, so ``import emloc.errors`` stays light and the package
itself imports nothing from its floors (see docs/architecture.md).
"""
import importlib

_HOME = {
    "RunConfig": "emloc.config", "PRESETS": "emloc.config", "EmlocError": "emloc.errors",
    "Run": "emloc.pipeline", "build": "emloc.pipeline", "calibrate": "emloc.pipeline",
    "correct": "emloc.pipeline",
    "evaluate": "emloc.pipeline", "results_table": "emloc.pipeline", "run_pipeline": "emloc.pipeline",
    "run_stages": "emloc.pipeline", "train": "emloc.pipeline", "RunDir": "emloc.rundir",
    "STAGES": "emloc.stages",
}
__all__ = list(_HOME)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'emloc' has no attribute {name!r}")
