"""The README's memory headline as a user meets it: the README's own commands, each in a fresh process, their
peak resident memory measured from outside (GNU time's maximum RSS, else the child's ``VmHWM``).

    python benchmarks/bench_readme_commands.py [--steps 10] [--out benchmarks/out/readme_commands]

Runs, with the default flags of each command (float32, the standard preset):

1. ``emloc calibrate --preset standard`` and ``emloc build`` (the emulator at ratio 0.5);
2. ``emloc train --on emulator --steps N``: LoRA on the emulator, the command the README promises fits;
3. ``emloc train --on original --steps N``: LoRA on the original, for reference;
4. inference with the original: the original model loaded as the suite loads it, a no-grad forward over a
   batch of 8 training examples padded to the preset's ``max_length``, then 16 greedy tokens for them
   (``inference_child`` below; the suite has no inference command, so this is its closest user path).

Inference and the two trainings run ``--repeats`` times, alternating; the figures are the medians (every
repeat is kept). Writes ``benchmarks/results/readme_commands.json`` (peaks, ratios, each run's own seconds per
step) and its provenance record (settings, commit, machine).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MB = 2 ** 20


def peak_of(command: list[str]) -> dict:
    """Run ``command`` in a fresh process; its peak RSS (MB) from outside and its wall seconds."""
    time_tool = shutil.which("time") and Path("/usr/bin/time")
    start = time.perf_counter()
    if time_tool and time_tool.exists():
        done = subprocess.run([str(time_tool), "-f", "PEAK_KB=%M", *command], cwd=ROOT, capture_output=True,
                              text=True)
        found = re.findall(r"PEAK_KB=(\d+)", done.stderr)
        peak = int(found[-1]) * 1024 / MB if found else float("nan")
    else:  # no GNU time: the child reports its own high-water mark
        done = subprocess.run([*command], cwd=ROOT, capture_output=True, text=True)
        found = re.findall(r"VMHWM_KB=(\d+)", done.stdout)
        peak = int(found[-1]) * 1024 / MB if found else float("nan")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    shown = command[2:] if command[:2] == [sys.executable, "-m"] else ["python", *command[1:]]
    return {"command": " ".join(shown), "peak_rss_mb": peak, "wall_s": time.perf_counter() - start}


def inference_child(run_dir: str) -> None:
    """Inference with the original model in this process (see the module docstring)."""
    import torch

    from emloc.pipeline import Run
    run = Run(run_dir, progress=False)
    model = run.fresh_model()
    features = run.features("train")[:8]
    pad = run.tokenizer.pad_token_id
    width = run.config.data.max_length
    ids = torch.full((len(features), width), pad)
    mask = torch.zeros_like(ids)
    for row, feature in enumerate(features):
        tokens = torch.tensor(feature["input_ids"][:width])
        ids[row, -len(tokens):], mask[row, -len(tokens):] = tokens, 1  # left padding, as for generation
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=pad)
    status = Path("/proc/self/status")
    if status.exists():
        print("VMHWM_KB=" + re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1))


def repeat(rows: dict, name: str, row: dict) -> None:
    """Keep every repeat of a command; the row's figures are the medians over them."""
    import statistics
    runs = rows.get(name, {}).get("repeats", []) + [row]
    rows[name] = {"command": row["command"], "repeats": runs,
                  **{key: statistics.median(r[key] for r in runs)
                     for key in ("peak_rss_mb", "wall_s", "seconds_per_step") if key in row}}


def seconds_per_step(run_dir: Path, which: str) -> float:
    """The run's own figure: the Trainer's runtime over the steps (``training/*.json``)."""
    summary = run_dir / "training" / f"{ {'emulator': 'emulator_lora', 'original': 'full_lora'}[which]}.json"
    return float(json.loads(summary.read_text())["seconds_per_step"]) if summary.exists() else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each inference/training command")
    parser.add_argument("--out", default="benchmarks/out/readme_commands")
    parser.add_argument("--inference-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inference_child:
        inference_child(args.inference_child)
        return 0
    out = Path(args.out)  # relative to the repository (the children run there): no machine path is recorded
    emloc = [sys.executable, "-m", "emloc"]
    rows = {"calibrate": peak_of([*emloc, "calibrate", "--preset", "standard", "--out", str(out)]),
            "build": peak_of([*emloc, "build", "--out", str(out)])}
    for _ in range(args.repeats):  # alternating, so a slow moment of the machine touches every command
        repeat(rows, "inference_original",
               peak_of([sys.executable, "benchmarks/bench_readme_commands.py", "--inference-child", str(out)]))
        for which in ("emulator", "original"):
            (ROOT / out / "manifests" / f"train_{which}.json").unlink(missing_ok=True)  # train again, not reuse
            row = peak_of([*emloc, "train", "--on", which, "--steps", str(args.steps), "--out", str(out)])
            repeat(rows, f"train_{which}", row | {"seconds_per_step": seconds_per_step(ROOT / out, which)})
    inference = rows["inference_original"]["peak_rss_mb"]
    result = {"steps": args.steps, "rows": rows,
              "lora_emulator_over_inference_original": rows["train_emulator"]["peak_rss_mb"] / inference,
              "step_time_emulator_over_original": (rows["train_emulator"]["seconds_per_step"]
                                                   / rows["train_original"]["seconds_per_step"]),
              "lora_original_over_inference_original": rows["train_original"]["peak_rss_mb"] / inference}
    for name, row in rows.items():
        print(f"{name:20s} {row['peak_rss_mb']:8.0f} MB  {row['wall_s']:7.1f} s  "
              f"{row.get('seconds_per_step', float('nan')):.2f} s/step")
    print(f"LoRA on the emulator / inference with the original: "
          f"{result['lora_emulator_over_inference_original']:.2f}x")
    sys.path.insert(0, str(ROOT))
    from emloc import io, provenance
    io.write_json(RESULTS / "readme_commands.json", result)
    provenance.write(RESULTS / "readme_commands.json", provenance.record(
        {"readme": {"preset": "standard"}},
        command=f"python benchmarks/bench_readme_commands.py --steps {args.steps} --repeats {args.repeats}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
