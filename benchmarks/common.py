"""Shared setup for the benchmark scripts: one prepared run of the default model (calibrated, built)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from emloc import pipeline, sweeps
from emloc.config import RunConfig

OUT = Path(os.environ.get("EMLOC_BENCH_OUT", "benchmarks/out"))
RESULTS = Path(os.environ.get("EMLOC_BENCH_RESULTS", "benchmarks/results"))
BENCH_CONFIG = {"device": "cpu", "data": {"task": "arithmetic", "n_train": 300, "n_calibration": 32, "n_test": 60,
                                          "max_length": 96},
                "lora": {"steps": 40, "batch_size": 8, "warmup_steps": 4, "learning_rate": 0.002}}


def prepared_run(stages=("calibrate", "build"), ratio: float = 0.5) -> pipeline.Run:
    """The benchmark run directory with the given stages finished (reused when already done)."""
    config = RunConfig.from_dict({**BENCH_CONFIG, "emulator": {"ratio": ratio}})
    run = pipeline.Run(OUT / f"bench_run_ratio{ratio}", config, progress=False)
    sweep_points = sorted(OUT.glob("*/points/*"))  # any sweep point with the same fingerprints donates its stages
    sweeps.adopt_finished_stages(run, [pipeline.Run(p, progress=False) for p in sweep_points])
    for stage in stages:
        if not run.is_done(stage):
            getattr(pipeline, stage)(run)
    return run


def threads() -> int:
    count = int(os.environ.get("EMLOC_BENCH_THREADS", "1"))
    torch.set_num_threads(count)
    return count
