"""Peak memory of layer-streamed emulator construction vs the model's size.

Each construction runs in a fresh subprocess, which reports its peak resident memory (``VmHWM``).
For the default model the in-memory path runs too, and the two emulators are compared.

    python benchmarks/make_big_model.py runs/big-llama         # once: a random 1.5B+ Llama in shards
    python benchmarks/bench_streaming.py --big runs/big-llama   # prints the table
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GB = 2**30


def run_config(model: str, compute_dtype: str, n_calibration: int, max_length: int, targets: list[str] | None = None) -> dict:
    emulator = {"compute_dtype": compute_dtype} | ({"target_modules": targets} if targets else {})
    return {"model": model, "device": "cpu", "dtype": "float32",
            "data": {"n_train": 4 * n_calibration, "n_calibration": n_calibration, "n_test": 4, "max_length": max_length},
            "emulator": emulator}


def big_targets(full_layers: int) -> list[str] | None:
    """All 7 projections in the first ``full_layers`` layers, k/v (cheap: 256 outputs) in the others.

    Every layer is still read, run and freed, and the layers are identical in shape, so the peak of a
    fully factored layer is measured while the run stays within a shared 2-core machine's time
    (all 7 projections of all 30 layers take ~1 CPU-minute per layer). ``None``: all projections everywhere.
    """
    if full_layers < 0:
        return None
    layers = "|".join(str(i) for i in range(full_layers))
    return [rf"model\.layers\.({layers})\..*_proj", "k_proj", "v_proj"] if full_layers else ["k_proj", "v_proj"]


def worker(mode: str, out: str, raw_config: str) -> None:
    """Build one emulator (``streamed`` or ``in_memory``) or just import (``baseline``); print JSON."""
    import torch
    torch.set_num_threads(1)
    from emloc import pipeline, streaming
    from emloc.memory import process_rss_bytes
    from emloc.config import RunConfig
    run = pipeline.Run(out, RunConfig.from_dict(json.loads(raw_config)), progress=False)
    start = time.perf_counter()
    if mode == "streamed":
        streaming.stream_build(run)
    elif mode == "in_memory":
        pipeline.build(run, pipeline.calibrate(run))
    else:
        run.features("calibration")
    peak = process_rss_bytes(peak=True)
    print(json.dumps({"mode": mode, "peak_rss_bytes": peak, "seconds": time.perf_counter() - start}))


def measure(mode: str, out: Path, config: dict) -> dict:
    command = [sys.executable, __file__, "--worker", mode, str(out), json.dumps(config)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(label: str, model: str, modes: list[str], out_root: Path, config: dict) -> list[dict]:
    from emloc.models import resolve_model_path
    from emloc.streaming import model_size
    size = model_size(resolve_model_path(model))
    rows = []
    for mode in ["baseline", *modes]:
        result = measure(mode, out_root / f"{label}-{mode}", config)
        rows.append({"model": label, "parameters_B": size["parameters"] / 1e9, "disk_GB": size["disk_bytes"] / GB,
                     "float32_GB": size["float32_bytes"] / GB, **result, "peak_rss_GB": result["peak_rss_bytes"] / GB})
        print(f"  {label:8s} {mode:10s} peak RSS {rows[-1]['peak_rss_GB']:.2f} GB in {result['seconds']:.0f} s", flush=True)
    return rows


def max_factor_difference(first: Path, second: Path) -> float:
    from emloc import pipeline
    a, b = pipeline.Run(first, progress=False).factors(), pipeline.Run(second, progress=False).factors()
    return max(float((a.W_emulated(n).double() - b.W_emulated(n).double()).abs().max()) for n in a.u)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", help="folder written by make_big_model.py (skip the big model when absent)")
    parser.add_argument("--out", default="runs/bench-streaming", help="scratch run directories")
    parser.add_argument("--n-calibration", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--big-full-layers", type=int, default=1,
                        help="layers of the big model with all 7 projections factored (others: k/v); -1: all layers")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    import pandas as pd
    out = Path(args.out)
    rows = []
    if args.big:  # first: it is the long one
        targets = big_targets(args.big_full_layers)
        print("big model targets:", targets or "all projections", flush=True)
        rows += bench("big", args.big, ["streamed"], out,
                      run_config(args.big, "float32", args.n_calibration, args.max_length, targets))
    if not args.skip_default:
        config = run_config("default", "float64", args.n_calibration, args.max_length)
        rows += bench("default", "default", ["streamed", "in_memory"], out, config)
        difference = max_factor_difference(out / "default-streamed", out / "default-in_memory")
        print(f"default model: max |W'_streamed - W'_in_memory| = {difference:.3g}")
    table = pd.DataFrame(rows)
    table["peak_over_float32_size"] = table["peak_rss_GB"] / table["float32_GB"]
    table["peak_over_disk_size"] = table["peak_rss_GB"] / table["disk_GB"]
    columns = ["model", "mode", "parameters_B", "disk_GB", "float32_GB", "peak_rss_GB", "peak_over_float32_size",
               "peak_over_disk_size", "seconds"]
    print(table[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
