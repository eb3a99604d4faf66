"""Stage 2 on several processes: LoRA with DDP (gloo on CPU, nccl on GPUs) through ``torchrun``.

:func:`train_distributed` launches ``python -m torch.distributed.run --nproc-per-node N -m
emloc.distributed --out RUN``. Each process loads the run's emulator (or the original model) and
trains the same peft LoRA with :func:`emloc.lora.train_lora`; ``transformers.Trainer`` sees the
torchrun environment and wraps the model in DistributedDataParallel. Each process takes
``batch_size / N`` examples per step, so the global batch is the configured one. Process 0 writes
the adapter folder, summary and manifest exactly as :func:`emloc.pipeline.train` does.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from emloc.errors import EmlocError


def launch_command(run_dir: str | Path, which: str = "emulator", num_processes: int = 2) -> list[str]:
    """The ``torchrun`` command line (single node, a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={num_processes}", "-m", "emloc.distributed", "--out", str(run_dir),
            "--which", which]


def train_distributed(run_dir: str | Path, which: str = "emulator", num_processes: int = 2,
                      threads_per_process: int = 1, timeout: float | None = None) -> dict:
    """Train LoRA on ``num_processes`` processes; returns the training summary process 0 wrote."""
    from emloc.rundir import RunDir  # heavy imports only in the parent that asked for them

    if which not in ("emulator", "original"):
        raise EmlocError(f"cannot train on {which!r}: use 'emulator' or 'original'")
    if num_processes < 1:
        raise EmlocError(f"num_processes = {num_processes}: use 1 or more")
    run = RunDir(run_dir)
    if which == "emulator":
        run.require("build", "build")
    run.begin(f"train_{which}")
    env = os.environ | {"OMP_NUM_THREADS": str(threads_per_process), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(launch_command(run.dir, which, num_processes), env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise EmlocError(f"distributed training exited with code {done.returncode}; "
                         f"its last messages:\n{tail}")
    return run.history(which)


def worker(run_dir: str, which: str) -> None:
    """One training process: the body torchrun starts N times."""
    import torch.distributed as dist

    from emloc.lora import train_lora
    from emloc.pipeline import Run, recovered_adapter
    from emloc.rundir import check_finite_losses, save_training

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run = Run(run_dir, progress=rank == 0)
    cfg = run.config
    spec = dataclasses.replace(cfg.lora, batch_size=max(1, cfg.lora.batch_size // world))
    model = run.emulator() if which == "emulator" else run.fresh_model()
    result = train_lora(model, run.features("train"), spec, cfg.emulator.target_modules,
                        run.tokenizer.pad_token_id, seed=cfg.seed, progress=rank == 0)
    if rank == 0:
        check_finite_losses(result.history, which)
        save_training(run, which, result, recovered_adapter(run, which, result.model), processes=world,
                      per_process_batch_size=spec.batch_size)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emloc.distributed",
                                     description="one LoRA training process")
    parser.add_argument("--out", required=True, help="run directory with a finished build stage")
    parser.add_argument("--which", choices=["emulator", "original"], default="emulator")
    args = parser.parse_args(argv)
    worker(args.out, args.which)


if __name__ == "__main__":
    main()
