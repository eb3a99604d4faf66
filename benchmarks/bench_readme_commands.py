"""The README's memory headline as a user meets it: the README's own commands, each in a fresh process, their
peak resident memory measured from outside (GNU time's maximum RSS, else the child's ``VmHWM``).

    python benchmarks/bench_readme_commands.py [--steps 10] [--out benchmarks/out/readme_commands]

Runs, with the default flags of each command (float32, the standard preset):

1. ``emloc calibrate --preset standard`` and ``emloc build`` (the emulator at ratio 0.5);
2. ``emloc train --on emulator --steps N``: LoRA on the emulator, the command the README promises fits;
3. ``emloc train --on original --steps N``: LoRA on the original, for reference;
4. inference with the original: the original model loaded as the suite loads it, a no-grad forward over a
   batch of 8 training examples padded to the preset's ``max_length``, then 16 greedy tokens for them
   (``inference_child`` below; the suite has no inference command, so this is its closest user path), once
   as it is and once with the compact heap ``emloc`` commands start with (:mod:`emloc.heap`), to show that the
   comparison does not hinge on the allocator, and once as generation alone (no forward over the whole batch,
   so no logits at every position: the leanest inference);
5. ``emloc train --on emulator --memory-budget inference --steps N`` in a copy of the run: the budget plan's
   peak and step time, idle and then beside a neighbour (the same training in a second copy).

Inference and the two trainings run ``--repeats`` times, alternating; the figures are the medians (every
repeat is kept). Writes ``benchmarks/results/readme_commands.json`` (peaks, ratios, each run's own seconds per
step) and its provenance record (settings, commit, machine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emloc import heap  # noqa: E402  (light: no torch)
RESULTS = ROOT / "benchmarks" / "results"
EMLOC = [sys.executable, "-m", "emloc"]
RATIO_SUFFIXES = ("_original", "_default", "_idle", "_only")
"""The keys of a result that are ratios (printed and listed under the table)."""
MB = 2 ** 20


def peak_of(command: list[str], env: dict | None = None) -> dict:
    """Run ``command`` in a fresh process; its peak RSS (MB) from outside and its wall seconds."""
    time_tool = shutil.which("time") and Path("/usr/bin/time")
    start = time.perf_counter()
    if time_tool and time_tool.exists():
        done = subprocess.run([str(time_tool), "-f", "PEAK_KB=%M", *command], cwd=ROOT, capture_output=True,
                              text=True, env=env)
        found = re.findall(r"PEAK_KB=(\d+)", done.stderr)
        peak = int(found[-1]) * 1024 / MB if found else float("nan")
    else:  # no GNU time: the child reports its own high-water mark
        done = subprocess.run([*command], cwd=ROOT, capture_output=True, text=True, env=env)
        found = re.findall(r"VMHWM_KB=(\d+)", done.stdout)
        peak = int(found[-1]) * 1024 / MB if found else float("nan")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    shown = command[2:] if command[:2] == [sys.executable, "-m"] else ["python", *command[1:]]
    return {"command": " ".join(shown), "peak_rss_mb": peak, "wall_s": time.perf_counter() - start}


def inference_child(run_dir: str, generate_only: bool = False) -> None:
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
        if not generate_only:  # a forward over the whole batch: logits at every position
            model(input_ids=ids, attention_mask=mask)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                       pad_token_id=pad)
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


def with_neighbour(command: list[str], neighbour: list[str]) -> dict:
    """``command``'s peak and wall time while ``neighbour`` (a second training) runs beside it."""
    beside = subprocess.Popen(neighbour, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(8)  # the neighbour is past its imports and loading, into its steps
        return peak_of(command)
    finally:
        beside.terminate()
        beside.wait()


def seconds_per_step(run_dir: Path, which: str) -> float:
    """The run's own figure: the Trainer's runtime over the steps (``training/*.json``)."""
    summary = run_dir / "training" / f"{ {'emulator': 'emulator_lora', 'original': 'full_lora'}[which]}.json"
    return float(json.loads(summary.read_text())["seconds_per_step"]) if summary.exists() else float("nan")


def trained(out: Path, which: str, extra: list[str], neighbour: list[str] | None = None) -> dict:
    """``emloc train --on which`` in ``out`` afresh (not reused), alone or beside ``neighbour``: its peak,
    wall time and seconds per step."""
    (ROOT / out / "manifests" / f"train_{which}.json").unlink(missing_ok=True)
    command = [*EMLOC, "train", "--on", which, "--out", str(out), *extra]
    row = peak_of(command) if neighbour is None else with_neighbour(command, neighbour)
    return row | {"seconds_per_step": seconds_per_step(ROOT / out, which)}


LABELS = {
    "calibrate": "`emloc calibrate --preset standard`", "build": "`emloc build`",
    "inference_original": "inference with the original (glibc's default heap)",
    "inference_original_compact_heap": "inference with the original, compact heap",
    "inference_original_generate_only": "generation alone with the original (no whole-batch forward)",
    "train_emulator": "**`emloc train --on emulator`**", "train_original": "`emloc train --on original`",
    "train_emulator_budget": "`emloc train --on emulator --memory-budget inference`",
    "train_emulator_budget_beside_a_neighbour": "the same, beside a second such training",
}


def markdown(result: dict) -> str:
    """The result as a Markdown table (rendered into benchmarks/README.md) and its ratios."""
    rows = result["rows"]
    inference = rows["inference_original"]["peak_rss_mb"]
    lines = ["| command | peak RSS (MB) | / inference | wall (s) | s per step |", "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        step = row.get("seconds_per_step")
        shown = "" if step is None else f"{step:.2f}"
        lines.append(f"| {LABELS.get(name, name)} | {row['peak_rss_mb']:.0f} "
                     f"| {row['peak_rss_mb'] / inference:.2f} | {row['wall_s']:.1f} | {shown} |")
    ratios = [f"- {key.replace('_', ' ')}: **{value:.2f}x**" for key, value in result.items()
              if key.endswith(RATIO_SUFFIXES)]
    return "\n".join([*lines, "", *ratios]) + "\n"


def write_result(stem: str, result: dict, table: str, configs: dict, command: str, **extra) -> None:
    """``RESULTS/stem.json`` and its Markdown ``table`` (``stem.md``), with one provenance record for both
    (taken before they are written, so the commit is the code's, not "+changes" from the results)."""
    from emloc import io, provenance
    record = provenance.record(configs, command=command, **extra)
    paths = [RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"]
    io.write_json(paths[0], result)
    paths[1].write_text(table, encoding="utf-8")
    provenance.write(paths, record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each inference/training command")
    parser.add_argument("--out", default="benchmarks/out/readme_commands")
    parser.add_argument("--inference-child", help=argparse.SUPPRESS)
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inference_child:
        inference_child(args.inference_child, args.generate_only)
        return 0
    out = Path(args.out)  # relative to the repository (the children run there): no machine path is recorded
    rows = {"calibrate": peak_of([*EMLOC, "calibrate", "--preset", "standard", "--out", str(out)]),
            "build": peak_of([*EMLOC, "build", "--out", str(out)])}
    # the budget plan trains in copies of the built run (its config then keeps the budget)
    budget_out, neighbour_out = Path(f"{out}_budget"), Path(f"{out}_neighbour")
    for copy in (budget_out, neighbour_out):
        shutil.rmtree(ROOT / copy, ignore_errors=True)
        shutil.copytree(ROOT / out, ROOT / copy)
    inference_command = [sys.executable, "benchmarks/bench_readme_commands.py", "--inference-child", str(out)]
    compact_env = heap.compact_heap_environment(dict(os.environ)) or dict(os.environ)
    steps = ["--steps", str(args.steps)]
    budget = ["--memory-budget", "inference", *steps]
    for _ in range(args.repeats):  # alternating, so a slow moment of the machine touches every command
        repeat(rows, "inference_original", peak_of(inference_command))
        repeat(rows, "inference_original_compact_heap", peak_of(inference_command, env=compact_env))
        repeat(rows, "inference_original_generate_only", peak_of([*inference_command, "--generate-only"]))
        for which in ("emulator", "original"):
            repeat(rows, f"train_{which}", trained(out, which, steps))
        repeat(rows, "train_emulator_budget", trained(budget_out, "emulator", budget))
    neighbour = [*EMLOC, "train", "--on", "emulator", "--out", str(neighbour_out), *budget[:2],
                 "--steps", str(10 * args.steps)]  # outlasts the measured run
    for _ in range(args.repeats):
        repeat(rows, "train_emulator_budget_beside_a_neighbour",
               trained(budget_out, "emulator", budget, neighbour))
    inference = rows["inference_original"]["peak_rss_mb"]
    generation = rows["inference_original_generate_only"]
    step = {name: rows[name]["seconds_per_step"] for name in rows if "seconds_per_step" in rows[name]}
    result = {"steps": args.steps, "rows": rows,
              "lora_emulator_over_inference_original": rows["train_emulator"]["peak_rss_mb"] / inference,
              "step_time_emulator_over_original": step["train_emulator"] / step["train_original"],
              "lora_original_over_inference_original": rows["train_original"]["peak_rss_mb"] / inference,
              "lora_emulator_over_generation_only": (rows["train_emulator"]["peak_rss_mb"]
                                                     / generation["peak_rss_mb"]),
              "budget_over_inference_original": rows["train_emulator_budget"]["peak_rss_mb"] / inference,
              "budget_step_time_over_default": step["train_emulator_budget"] / step["train_emulator"],
              "budget_step_time_beside_a_neighbour_over_idle": (
                  step["train_emulator_budget_beside_a_neighbour"] / step["train_emulator_budget"]),
              "compact_heap": heap.COMPACT_HEAP_TUNABLES}
    for name, row in rows.items():
        print(f"{name:20s} {row['peak_rss_mb']:8.0f} MB  {row['wall_s']:7.1f} s  "
              f"{row.get('seconds_per_step', float('nan')):.2f} s/step")
    for key, value in result.items():
        if key.endswith(RATIO_SUFFIXES):
            print(f"{key}: {value:.2f}x")
    write_result("readme_commands", result, markdown(result), {"readme": {"preset": "standard"}},
                 f"python benchmarks/bench_readme_commands.py --steps {args.steps} --repeats {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
