"""Peak memory of each stage, each measured in a fresh process (the default model, float32, CPU).

Peak resident memory (``ru_maxrss``) of a child process that imports the suite and runs one stage;
with a CUDA device the allocator peak is recorded too. "above_import" subtracts the resident memory
right after the imports (torch and transformers alone take a few hundred MB).

Stages: inference with the original model (a test batch: loss + greedy generation), LoRA on the
original model, emulator construction (original model + statistics -> factors), LoRA on the
emulator (loaded lean: the original's targeted weights are never read), and LoRA correction.

    python benchmarks/bench_memory.py [--steps 3]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
STAGES = ["inference_original", "lora_original", "construction", "lora_emulator", "correction"]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lora_steps(model, run, steps: int) -> None:
    import torch

    from emloc.data import PaddingCollator
    from emloc.lora import add_lora
    batch = PaddingCollator(run.tokenizer.pad_token_id)(run.features("train")[: run.config.lora.batch_size])
    peft_model = add_lora(model, run.config.lora, run.config.emulator.target_modules, seed=0)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def child(stage: str, steps: int) -> dict:
    import torch

    from common import prepared_run
    from emloc.memory import load_emulator_lean
    torch.set_num_threads(1)
    run = prepared_run(())  # artifacts were prepared by the parent; nothing is computed here
    cfg = run.config
    baseline = rss_mb()
    if stage == "inference_original":
        from emloc.data import TaskData
        from emloc.evaluation import evaluate_model
        data = run.data
        evaluate_model(run.fresh_model(), run.tokenizer, TaskData(data.task, [], [], data.test[: cfg.lora.batch_size]),
                       cfg.data.max_length, cfg.evaluation.max_new_tokens, cfg.lora.batch_size)
    elif stage == "lora_original":
        lora_steps(run.fresh_model(), run, steps)
    elif stage == "construction":
        from emloc.emulator import build_factors
        build_factors(run.fresh_model(), run.stats(), cfg.emulator, progress=False)
    elif stage == "lora_emulator":
        lora_steps(load_emulator_lean(cfg.model, run.factors(), cfg.dtype), run, steps)
    elif stage == "correction":
        from emloc.correction import correct_adapter
        from emloc.lora import load_adapter
        correct_adapter(load_adapter(run.fresh_model(), run.adapter_dir("emulator")), run.factors(), cfg.correction.clamp)
    result = {"stage": stage, "peak_rss_mb": peak_mb(), "rss_after_import_mb": baseline}
    result["above_import_mb"] = result["peak_rss_mb"] - baseline
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=STAGES, help="re-measure these stages, keep the others from memory.json")
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(child(args.stage, args.steps)))
        return
    from common import RESULTS, prepared_run
    prepared_run(("calibrate", "build", "train_emulator"))
    stored = RESULTS / "memory.json"
    kept = json.loads(stored.read_text())["stages"] if args.only and stored.exists() else []
    rows = [r for r in kept if r["stage"] not in (args.only or STAGES)]
    for stage in args.only or STAGES:
        output = subprocess.run([sys.executable, __file__, "--stage", stage, "--steps", str(args.steps)], check=True,
                                capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{stage}: peak {rows[-1]['peak_rss_mb']:.0f} MB ({rows[-1]['above_import_mb']:.0f} MB above import)", flush=True)
    rows.sort(key=lambda r: STAGES.index(r["stage"]))
    peaks = {r["stage"]: r["peak_rss_mb"] for r in rows}
    summary = {"stages": rows, "lora_emulator_over_inference_original": peaks["lora_emulator"] / peaks["inference_original"],
               "lora_emulator_over_lora_original": peaks["lora_emulator"] / peaks["lora_original"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print({k: round(v, 3) for k, v in summary.items() if k != "stages"})


if __name__ == "__main__":
    main()
