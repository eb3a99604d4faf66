"""EMLoC: emulator-based memory-efficient fine-tuning with LoRA correction.

Stages: :func:`calibrate` -> :func:`build` -> :func:`train` -> :func:`correct` -> :func:`evaluate`,
each reading and writing one :class:`Run` directory (the stages are listed once in :data:`STAGES`).
"""
from emloc.config import RunConfig, PRESETS
from emloc.errors import EmlocError
from emloc.pipeline import Run, build, calibrate, correct, evaluate, results_table, run_pipeline, train
from emloc.rundir import RunDir
from emloc.stages import STAGES

__all__ = ["RunConfig", "PRESETS", "EmlocError", "Run", "RunDir", "STAGES", "calibrate", "build", "train", "correct",
           "evaluate", "run_pipeline", "results_table"]
__version__ = "0.1.0"
