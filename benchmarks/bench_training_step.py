"""LoRA training step time on the emulator vs the original model, same batch, same LoRA, same thread count.

A step is forward + backward + AdamW on the LoRA weights, on one fixed batch of training examples
(median of the timed steps after warm-up).

    python benchmarks/bench_training_step.py [--steps 8] [--ratio 0.5]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, prepared_run, threads  # noqa: E402

from emloc.data import PaddingCollator  # noqa: E402
from emloc.lora import add_lora  # noqa: E402


def step_times(model, batch, run, steps: int, warmup: int = 2) -> list[float]:
    peft_model = add_lora(model, run.config.lora, run.config.emulator.target_modules, seed=0)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    n_threads = threads()
    run = prepared_run(("calibrate", "build"), args.ratio)
    batch = PaddingCollator(run.tokenizer.pad_token_id)(run.features("train")[: run.config.lora.batch_size])
    result = {"ratio": args.ratio, "batch_size": run.config.lora.batch_size, "tokens": int(batch["attention_mask"].sum()),
              "threads": n_threads, "steps": args.steps}
    # interleave the two models twice so that load changes on the shared machine hit both alike
    samples = {"original": [], "emulator": []}
    for _ in range(2):
        samples["original"] += step_times(run.fresh_model(), batch, run, args.steps // 2)
        samples["emulator"] += step_times(run.emulator(), batch, run, args.steps // 2)
    for name, times in samples.items():
        result[f"{name}_s_per_step"] = statistics.median(times)
    result["emulator_over_original"] = result["emulator_s_per_step"] / result["original_s_per_step"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"training_step_ratio{args.ratio}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
