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
    """A finished seed's stage seconds, evaluation's share of them and the training precision (from its
    results and training summaries)."""
    results = json.loads((run_dir / "results.json").read_text())
    training = json.loads((run_dir / "training" / "emulator_lora.json").read_text())
    seconds = results.get("stage_seconds", {})
    return {"stage_seconds": seconds, "precision": training.get("precision"),
            "evaluation_share": seconds.get("evaluate", 0.0) / max(sum(seconds.values()), 1e-9),
            "seconds_per_step_emulator": training.get("seconds_per_step")}


def markdown(result: dict) -> str:
    """The wall time and each seed's stages as a Markdown table (rendered into benchmarks/README.md)."""
    stages = sorted({stage for seed in result["seeds"].values() for stage in seed["stage_seconds"]})
    lines = ["| seed | precision | " + " | ".join(stages) + " | evaluation's share |",
             "|---|---|" + "---:|" * len(stages) + "---:|"]
    for name, seed in result["seeds"].items():
        cells = " | ".join(f"{seed['stage_seconds'].get(stage, 0.0):.0f} s" for stage in stages)
        lines.append(f"| {name} | {seed['precision']} | {cells} | {seed['evaluation_share']:.2f} |")
    lines.append(f"| **all, {result['jobs']} at a time** | | " + " | ".join("" for _ in stages)
                 + f" | **{result['wall_min']:.1f} min wall** |")
    return "\n".join(lines) + "\n"


def write(result: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from emloc import io
    io.write_json(RESULTS / "class_prepare.json", result)
    (RESULTS / "class_prepare.md").write_text(markdown(result), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--summaries-only", action="store_true",
                        help="keep the stored wall time; re-read the finished seeds' summaries")
    args = parser.parse_args(argv)
    if args.summaries_only:
        stored = json.loads((RESULTS / "class_prepare.json").read_text())
        stored["seeds"] = {seed: seed_summary(ROOT / OUT / f"seed{seed}") for seed in stored["seeds"]}
        write(stored)
        return 0
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
    write(result)
    from emloc import provenance
    shown = f"--seeds {' '.join(args.seeds)} --jobs {args.jobs} --precision {args.precision}"
    record = provenance.record({"class": {"preset": "standard", "lora": {"precision": args.precision}}},
                               command=f"python benchmarks/bench_class_prepare.py {shown}", seeds=args.seeds,
                               jobs=args.jobs)
    provenance.write([RESULTS / "class_prepare.json", RESULTS / "class_prepare.md"], record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
