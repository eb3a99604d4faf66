"""Peak memory of DreamBooth LoRA on the digits denoiser's emulator against inference with the original, each
in a fresh process, measured from outside (GNU time's maximum RSS, else the child's ``VmHWM``).

    python benchmarks/bench_denoiser_memory.py [--repeats 3] [--out benchmarks/out/denoiser_memory]

Runs ``emloc calibrate --model digits-dit`` and ``emloc build`` once, then, alternating: ``emloc train --on
emulator``, ``emloc train --on original`` (default flags: 300 steps of 16 images) and inference with the
original (the cached denoiser loaded as the run loads it, then the evaluation's samples: 20 of every digit,
DDIM with guidance). The memory ledger models Llama-style decoders only, so it predicts nothing here. Writes
``benchmarks/results/denoiser_memory.{json,md}`` and their provenance record.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_readme_commands import EMLOC, peak_of, repeat, trained, write_result  # noqa: E402

LABELS = {"inference_original": "inference with the original (200 samples)",
          "train_emulator": "**`emloc train --on emulator`**",
          "train_original": "`emloc train --on original`"}


def inference_child(run_dir: str) -> None:
    """Inference with the original denoiser in this process: the evaluation's sampling, once."""
    import torch

    from emloc import denoiser
    from emloc.pipeline import Run
    run = Run(run_dir, progress=False)
    per_digit = run.config.dreambooth.samples_per_digit
    labels = torch.tensor([c for c in range(denoiser.N_CLASSES) for _ in range(per_digit)])
    denoiser.sample(run.fresh_model(), labels, run.task.preset, seed=1000)
    status = Path("/proc/self/status")
    if status.exists():
        print("VMHWM_KB=" + re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1))


def markdown(rows: dict) -> str:
    inference = rows["inference_original"]["peak_rss_mb"]
    lines = ["| command | peak RSS (MB) | / inference |", "|---|---:|---:|"]
    lines += [f"| {LABELS[name]} | {row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / inference:.2f} |"
              for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out/denoiser_memory")
    parser.add_argument("--inference-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inference_child:
        inference_child(args.inference_child)
        return 0
    out = args.out  # relative to the repository: no machine path is recorded
    peak_of([*EMLOC, "calibrate", "--model", "digits-dit", "--out", out])
    peak_of([*EMLOC, "build", "--out", out])
    rows: dict = {}
    for _ in range(args.repeats):
        child = [sys.executable, "benchmarks/bench_denoiser_memory.py", "--inference-child", out]
        repeat(rows, "inference_original", peak_of(child))
        for which in ("emulator", "original"):
            repeat(rows, f"train_{which}", trained(Path(out), which, []))
    inference = rows["inference_original"]["peak_rss_mb"]
    result = {"rows": rows,
              "lora_emulator_over_inference_original": rows["train_emulator"]["peak_rss_mb"] / inference,
              "lora_original_over_inference_original": rows["train_original"]["peak_rss_mb"] / inference,
              "ledger": "not applicable: the ledger models Llama-style decoders only"}
    print(markdown(rows))
    write_result("denoiser_memory", result, markdown(rows), {"digits-dit": {"model": "digits-dit"}},
                 f"python benchmarks/bench_denoiser_memory.py --repeats {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
