"""How long preparing a class takes: ``make class`` (the standard preset per seed, seeds side by side, one
thread each, ``--precision auto``; then the bundle), wall time from outside.

    python benchmarks/bench_class_prepare.py [--seeds 0 1 2] [--jobs N] [--precision auto]

Runs into ``benchmarks/out/class_prepare`` (removed first, so nothing is resumed) and writes
``benchmarks/results/class_prepare.json``: the wall seconds, each seed's own stage seconds and the precision
training used, with its provenance record (settings, commit, machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = Path("benchmarks/out/class_prepare")  # relative: no machine path is recorded


def seed_summary(run_dir: Path) -> dict:
    """A finished seed's stage seconds and training precision (from its results and training summaries)."""
    results = json.loads((run_dir / "results.json").read_text())
    training = json.loads((run_dir / "training" / "emulator_lora.json").read_text())
    return {"stage_seconds": results.get("stage_seconds", {}), "precision": training.get("precision"),
            "seconds_per_step_emulator": training.get("seconds_per_step")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)
    shutil.rmtree(ROOT / OUT, ignore_errors=True)
    command = ["make", "--no-print-directory", "class", f"CLASS_SEEDS={' '.join(args.seeds)}",
               f"CLASS_JOBS={args.jobs}", f"CLASS_PRECISION={args.precision}", f"CLASS_DIR={OUT}",
               f"CLASS_BUNDLE={OUT}/class_bundle.tar.gz"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    seeds = {seed: seed_summary(ROOT / OUT / f"seed{seed}") for seed in args.seeds}
    result = {"wall_s": wall, "wall_min": wall / 60, "seeds": seeds, "jobs": args.jobs,
              "cpus": os.cpu_count(), "precision_requested": args.precision,
              "bundle_mb": (ROOT / OUT / "class_bundle.tar.gz").stat().st_size / 2 ** 20}
    print(f"make class, {len(args.seeds)} seeds, {args.jobs} at a time: {wall / 60:.1f} min")
    sys.path.insert(0, str(ROOT))
    from emloc import io, provenance
    io.write_json(RESULTS / "class_prepare.json", result)
    shown = f"--seeds {' '.join(args.seeds)} --jobs {args.jobs} --precision {args.precision}"
    provenance.write(RESULTS / "class_prepare.json", provenance.record(
        {"class": {"preset": "standard", "lora": {"precision": args.precision}}},
        command=f"python benchmarks/bench_class_prepare.py {shown}", seeds=args.seeds, jobs=args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
