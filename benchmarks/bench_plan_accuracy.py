"""How well the memory planner predicts the peaks it plans for: ``emloc train --on emulator`` at each micro
batch (checkpointing on, the default), its peak RSS measured from outside, against the ledger's prediction
made exactly as ``--memory-budget`` makes it (in an ``emloc``-like process: compact heap, the run's tokenizer
and training data loaded), and the plan ``--memory-budget inference`` chooses.

    python benchmarks/bench_plan_accuracy.py [--steps 6] [--repeats 2] [--out benchmarks/out/plan_accuracy]

Reuses the run in ``--out`` when it is built, else runs ``emloc calibrate --preset standard`` and ``emloc
build`` there. Writes ``benchmarks/results/plan_accuracy.{json,md}`` and their provenance record.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_readme_commands import EMLOC, peak_of, repeat, trained, write_result  # noqa: E402
from emloc import heap  # noqa: E402  (light: no torch)

MICRO_BATCHES = (1, 2, 4, 8)


def predict_child(run_dir: str) -> None:
    """Print the ledger's LoRA-on-the-emulator peak (MB) at each micro batch and the 'inference' plan, from
    this process's state as the planner sees it in ``emloc train``."""
    import dataclasses

    from emloc import memory
    from emloc.pipeline import Run
    run = Run(run_dir, progress=False)
    features = run.features("train")
    settings = memory.planning_settings(run.config, features)
    config = memory.model_config(run.config.model)
    model = memory.meta_model(config)
    predicted = {}
    for micro in MICRO_BATCHES:
        trial = dataclasses.replace(settings, micro_batch_size=micro, gradient_checkpointing=True)
        predicted[micro] = float(memory.ledger(config, trial, model).loc["LoRA (emulator)", "total"] * 1024)
    plan = memory.plan_for_budget(config, settings, "inference")
    print("PREDICTION=" + json.dumps({
        "predicted_mb": predicted, "runtime_mb": settings.runtime_bytes / 2 ** 20,
        "seq_len": settings.seq_len, "loss_tokens": settings.loss_tokens,
        "allocator_slack": settings.allocator_slack, "inference_budget_mb": plan.budget_bytes / 2 ** 20,
        "plan": {"micro_batch_size": plan.micro_batch_size, "checkpointing": plan.gradient_checkpointing,
                 "ratio": plan.ratio}}))


def prediction(out: Path) -> dict:
    import subprocess
    environ = heap.compact_heap_environment(dict(os.environ)) or dict(os.environ)
    done = subprocess.run([sys.executable, __file__, "--predict-child", str(out)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("PREDICTION="))
    found = json.loads(line.split("=", 1)[1])
    found["predicted_mb"] = {int(micro): mb for micro, mb in found["predicted_mb"].items()}
    return found


def markdown(result: dict) -> str:
    lines = ["| micro batch | predicted peak (MB) | measured peak, median (MB) | range of repeats (MB) "
             "| prediction / highest - 1 | s per step |", "|---:|---:|---:|---:|---:|---:|"]
    for row in result["micro_batches"]:
        peaks = [r["peak_rss_mb"] for r in row["repeats"]]
        lines.append(f"| {row['micro_batch_size']} | {row['predicted_mb']:.0f} | {row['peak_rss_mb']:.0f} "
                     f"| {min(peaks):.0f}-{max(peaks):.0f} | {row['error']:+.1%} "
                     f"| {row['seconds_per_step']:.2f} |")
    plan = result["plan"]
    budget = result["inference_budget_mb"]
    lines += ["", f"- `--memory-budget inference` (the ledger's inference peak, {budget:.0f} MB) plans micro batch "
              f"{plan['micro_batch_size']} with checkpointing {'on' if plan['checkpointing'] else 'off'} at ratio "
              f"{plan['ratio']:g}",
              f"- largest prediction error against the highest repeat: **{result['largest_error']:.1%}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out/plan_accuracy")
    parser.add_argument("--predict-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.predict_child:
        predict_child(args.predict_child)
        return 0
    out = Path(args.out)  # relative to the repository: no machine path is recorded
    if not (ROOT / out / "manifests" / "build.json").exists():
        peak_of([*EMLOC, "calibrate", "--preset", "standard", "--out", str(out)])
        peak_of([*EMLOC, "build", "--out", str(out)])
    predicted = prediction(out)
    rows: dict = {}
    for _ in range(args.repeats):
        for micro in MICRO_BATCHES:
            repeat(rows, str(micro), trained(out, "emulator", ["--steps", str(args.steps),
                                                                "--micro-batch-size", str(micro)]))
    table = []
    for micro in MICRO_BATCHES:
        row, guess = rows[str(micro)], predicted["predicted_mb"][micro]
        highest = max(r["peak_rss_mb"] for r in row["repeats"])  # what a budget must hold
        table.append({"micro_batch_size": micro, "predicted_mb": guess, "peak_rss_mb": row["peak_rss_mb"],
                      "highest_peak_rss_mb": highest, "error": guess / highest - 1,
                      "seconds_per_step": row["seconds_per_step"], "repeats": row["repeats"]})
        print(f"micro batch {micro}: predicted {guess:.0f} MB, measured {row['peak_rss_mb']:.0f} MB, "
              f"{row['seconds_per_step']:.2f} s/step")
    result = {"steps": args.steps, "micro_batches": table,
              "largest_error": max(abs(row["error"]) for row in table),
              **{key: value for key, value in predicted.items() if key != "predicted_mb"}}
    print(markdown(result))
    write_result("plan_accuracy", result, markdown(result), {"standard": {"preset": "standard"}},
                 f"python benchmarks/bench_plan_accuracy.py --steps {args.steps} --repeats {args.repeats}",
                 micro_batches=list(MICRO_BATCHES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
