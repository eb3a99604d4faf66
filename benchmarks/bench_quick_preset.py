"""Which quick preset shows EMLoC best in the quickstart's few minutes: ``emloc run --preset quick`` with more
training steps, in float32 and with ``--precision auto``, each run in a fresh process, its wall time measured
from outside, and what each variant learned (exact-match accuracy and the share of the zero-shot -> full-LoRA
loss gap closed, ``emloc.reports.variant_summary``).

    python benchmarks/bench_quick_preset.py [--out benchmarks/out/quick_preset]

Writes ``benchmarks/results/quick_preset.{json,md}`` and their provenance record; notebook 00 reads the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_readme_commands import write_result  # noqa: E402
CANDIDATES = {"15 steps (today's quick preset)": ["--steps", "15"],
              "30 steps": ["--steps", "30"],
              "30 steps, --precision auto": ["--steps", "30", "--precision", "auto"],
              "45 steps, --precision auto": ["--steps", "45", "--precision", "auto"]}
SHOWN = ("emulator_lora", "transfer_corrected", "full_lora")


def measure(out: Path, flags: list[str]) -> dict:
    """One ``emloc run --preset quick`` afresh: wall seconds from outside, and its variants' summary."""
    from emloc.reports import variant_summary
    shutil.rmtree(ROOT / out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "emloc", "run", "--preset", "quick", "--out", str(out), *flags],
                   cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    results = json.loads((ROOT / out / "results.json").read_text(encoding="utf-8"))
    summary = variant_summary(results)
    training = json.loads((ROOT / out / "training" / "emulator_lora.json").read_text(encoding="utf-8"))
    return {"flags": flags, "wall_s": wall, "precision": training["precision"],
            "variants": {v: {"accuracy": float(summary.loc[v, "accuracy"]),
                             "loss_gap_closed": float(summary.loc[v, "loss_gap_closed"])} for v in SHOWN}}


def markdown(rows: dict) -> str:
    variants = " | ".join(f"{v}: accuracy, loss gap closed" for v in SHOWN)
    lines = [f"| setting | wall (s) | training | {variants} |", "|---|---:|---|" + "---:|" * len(SHOWN)]
    for name, row in rows.items():
        shown = [row["variants"][v] for v in SHOWN]
        cells = " | ".join(f"{v['accuracy']:.3f}, {v['loss_gap_closed']:.2f}" for v in shown)
        lines.append(f"| {name} | {row['wall_s']:.0f} | {row['precision']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/quick_preset")
    args = parser.parse_args(argv)
    rows = {}
    for index, (name, flags) in enumerate(CANDIDATES.items()):
        rows[name] = measure(Path(args.out) / f"candidate{index}", flags)
        print(name, f"{rows[name]['wall_s']:.0f} s", rows[name]["variants"], flush=True)
    print(markdown(rows))
    write_result("quick_preset", {"candidates": rows}, markdown(rows), {"quick": {"preset": "quick"}},
                 "python benchmarks/bench_quick_preset.py", candidates=dict(CANDIDATES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
