"""Peak memory of each stage, each measured in a fresh process, beside the analytic ledger's prediction.

Peak resident memory (``VmHWM``) of a child process that imports the suite and runs one stage;
with a CUDA device the allocator peak is recorded too. "above_import" subtracts the resident memory
right after the imports and the tokenised data (torch and transformers alone take a few hundred MB).

Default model (float32, CPU, batch 8, the same training examples for every training stage):

- ``inference_original``: a test batch through the original model (loss + greedy generation);
- ``lora_original`` / ``lora_emulator``: ``train_lora`` (the pipeline's training, checkpointing on, the
  default) on the original model / on the emulator loaded lean (the original is never in the process), with
  the small heap a memory budget sets (``small_heap``);
- ``*_no_checkpointing``: the same without activation checkpointing (under ``variants`` in memory.json);
- ``construction`` (original + statistics -> factors) and ``correction``;
- ``step_original`` / ``step_emulator`` (under ``timing``): the pipeline's default training (checkpointing
  on, glibc's own heap), timed over ``--timing-steps`` steps: the step-time ratio emulator / original at
  the run's ratio (0.5). The small heap costs page faults on every step, so the memory stages' step
  times are reported but are not the training speed.

Each training stage reports its median step time, and each stage the ledger's predicted peak (its tensors
plus the measured after-import memory).

    python benchmarks/bench_memory.py [--steps 4] [--timing-steps 8] [--only STAGE ...]
    python benchmarks/bench_memory.py --big runs/big-llama [--big-steps 2]   # the weights-dominated model

    python benchmarks/bench_memory.py --big runs/big-llama --big-timing --big-steps 4   # its step time, emulator / original

``--big``: a model written by ``make_big_model.py`` (bfloat16 files): a streamed build (``emloc build --stream``),
LoRA steps on its lean emulator, and inference with the original on the same prompt lengths; writes
``memory_big.json`` (float32) or ``memory_big_bfloat16.json``. Both load and train in float32 by default
(``--big-dtype``): on a CPU without native bfloat16 (AVX2 only) a bfloat16 backward pass runs below 1 GFLOPS,
so one LoRA step of the 1.5B emulator would take over an hour; with AVX-512 BF16 or AMX, bfloat16 is the
faster of the two. ``--big-timing`` instead times the pipeline's default training (checkpointing on, glibc's own
heap, as ``step_original`` / ``step_emulator`` do for the default model) on the original 1.5B model and on its
emulator, each in a fresh process, over ``--big-rounds`` rounds whose order alternates: ``big_step_time.json``, the
step-time ratio where the weights dominate.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from emloc.memory import process_rss_bytes  # noqa: E402

STAGES = ["inference_original", "lora_original", "construction", "lora_emulator", "correction"]
VARIANTS = ["lora_original_no_checkpointing", "lora_emulator_no_checkpointing"]
STEP_STAGES = ["step_original", "step_emulator"]  # the pipeline's default training, timed
ALL_STAGES = STAGES + VARIANTS + STEP_STAGES
BIG_STAGES = ["big_build", "big_inference_original", "big_lora_emulator"]
BIG_STEP_STAGES = ["big_step_original", "big_step_emulator"]  # the pipeline's default training, timed
MB = 2 ** 20


def rss_mb() -> float:
    return process_rss_bytes() / MB


def peak_mb() -> float:
    return process_rss_bytes(peak=True) / MB


def step_seconds(history_times: list[float], warmup: int = 1) -> float:
    """Median step time without the first ``warmup`` steps (allocations, lazy initialisation)."""
    return statistics.median(history_times[warmup:] or history_times)


def timed_training(model, features, spec, targets, pad_token_id, small_heap: bool = True) -> list[float]:
    """``train_lora`` (the pipeline's training) with a callback that times each optimizer step. ``small_heap``
    (as under a memory budget) keeps the heap from growing but costs page faults on every step."""
    from transformers import TrainerCallback

    from emloc.lora import train_lora
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    train_lora(model, features, spec, targets, pad_token_id, seed=0, progress=False, callbacks=[StepTimer()],
               small_heap=small_heap)
    return times


def training_features(run, steps: int) -> list[dict]:
    return run.features("train")[: run.config.lora.batch_size * steps]


def ledger_prediction(config, stage: str, batch_size: int, seq_len: int, loss_tokens: int, dtype: str, ratio: float,
                      checkpointing: bool, runtime_mb: float) -> float:
    """The analytic ledger's peak for ``stage`` (MB), its tensors plus the measured runtime share."""
    from emloc.memory import LedgerSettings, ledger
    settings = LedgerSettings(batch_size=batch_size, seq_len=seq_len, dtype=dtype, ratio=ratio, loss_tokens=loss_tokens,
                              gradient_checkpointing=checkpointing, runtime_bytes=runtime_mb * MB)
    row = {"inference": "inference (original)", "lora_original": "LoRA (original)", "lora_emulator": "LoRA (emulator)"}[stage]
    return float(ledger(config, settings).loc[row, "total"]) * 1024


def lengths(features: list[dict]) -> tuple[int, int]:
    """The longest sequence and the longest loss window (labelled tail + 1) among ``features``."""
    window = max(len(f["labels"]) - next(i for i, l in enumerate(f["labels"]) if l != -100) + 1 for f in features)
    return max(len(f["input_ids"]) for f in features), window


def child(stage: str, steps: int) -> dict:
    import torch

    from common import prepared_run
    from emloc.memory import model_config
    from emloc.pipeline import lean_emulator_for_training
    torch.set_num_threads(int(os.environ.get("EMLOC_BENCH_THREADS", "1")))
    run = prepared_run(())  # artifacts were prepared by the parent; nothing is computed here
    cfg = run.config
    train_features = training_features(run, steps)
    seq_len, window = lengths(train_features)
    baseline = rss_mb()
    result = {"stage": stage}
    checkpointing = not stage.endswith("_no_checkpointing")
    spec = dataclasses.replace(cfg.lora, steps=steps, warmup_steps=0, gradient_checkpointing=checkpointing)
    predict = lambda which, length, loss_tokens, ckpt=checkpointing: ledger_prediction(
        model_config(cfg.model), which, cfg.lora.batch_size, length, loss_tokens, cfg.dtype, cfg.emulator.ratio, ckpt,
        baseline)
    if stage == "inference_original":
        from emloc.data import TaskData
        from emloc.evaluation import evaluate_model
        data = run.data
        test = data.test[: cfg.lora.batch_size]
        evaluate_model(run.fresh_model(), run.tokenizer, TaskData(data.task, [], [], test),
                       cfg.data.max_length, cfg.evaluation.max_new_tokens, cfg.lora.batch_size)
        prompt_len = max(len(f["input_ids"]) for f in run.features("test")[: cfg.lora.batch_size])
        result["predicted_peak_mb"] = predict("inference", prompt_len + cfg.evaluation.max_new_tokens, 1)
    elif stage.startswith("lora_"):
        which = "lora_original" if stage.startswith("lora_original") else "lora_emulator"
        model = run.fresh_model() if which == "lora_original" else lean_emulator_for_training(run)
        times = timed_training(model, train_features, spec, cfg.emulator.target_modules, run.tokenizer.pad_token_id)
        result |= {"s_per_step": step_seconds(times), "checkpointing": checkpointing, "steps": steps,
                   "seq_len": seq_len, "predicted_peak_mb": predict(which, seq_len, window)}
    elif stage in STEP_STAGES:
        model = run.fresh_model() if stage == "step_original" else lean_emulator_for_training(run)
        times = timed_training(model, train_features, spec, cfg.emulator.target_modules, run.tokenizer.pad_token_id,
                               small_heap=False)
        result |= {"s_per_step": step_seconds(times, warmup=2), "checkpointing": True, "steps": steps,
                   "seq_len": seq_len}
    elif stage == "construction":
        from emloc.svd_emulator import build_factors
        build_factors(run.fresh_model(), run.stats(), cfg.emulator, progress=False)
    elif stage == "correction":
        from emloc.correction import correct_adapter
        from emloc.lora import load_adapter
        correct_adapter(load_adapter(run.fresh_model(), run.adapter_dir("emulator")), run.factors(), cfg.correction.clamp)
    result |= {"peak_rss_mb": peak_mb(), "rss_after_import_mb": baseline}
    result["above_import_mb"] = result["peak_rss_mb"] - baseline
    if "predicted_peak_mb" in result:
        result["prediction_error"] = result["predicted_peak_mb"] / result["peak_rss_mb"] - 1
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
    return result


def measure(mode: str, *extra: str) -> dict:
    command = [sys.executable, __file__, "--stage", mode, *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ledger_text(row: dict) -> str:
    if "predicted_peak_mb" not in row:
        return ""
    return f", ledger {row['predicted_peak_mb']:.0f} MB ({row['prediction_error']:+.0%})"


def summarise(rows: list[dict]) -> dict:
    peaks = {r["stage"]: r["peak_rss_mb"] for r in rows}
    steps = {r["stage"]: r["s_per_step"] for r in rows if "s_per_step" in r}
    summary = {"stages": [r for r in rows if r["stage"] in STAGES], "variants": [r for r in rows if r["stage"] in VARIANTS],
               "timing": [r for r in rows if r["stage"] in STEP_STAGES],
               "lora_emulator_over_inference_original": peaks["lora_emulator"] / peaks["inference_original"],
               "lora_emulator_over_lora_original": peaks["lora_emulator"] / peaks["lora_original"]}
    if "lora_emulator_no_checkpointing" in peaks:
        summary["lora_emulator_no_checkpointing_over_inference_original"] = (
            peaks["lora_emulator_no_checkpointing"] / peaks["inference_original"])
    ratios = {"step_time_emulator_over_original": ("step_emulator", "step_original"),
              "step_time_emulator_over_original_small_heap": ("lora_emulator", "lora_original"),
              "step_time_emulator_over_original_no_checkpointing": ("lora_emulator_no_checkpointing",
                                                                    "lora_original_no_checkpointing")}
    for key, (emulator, original) in ratios.items():
        if {emulator, original} <= set(steps):
            summary[key] = steps[emulator] / steps[original]
    return summary


def default_model(steps: int, timing_steps: int, only: list[str] | None) -> None:
    from common import RESULTS, prepared_run

    from emloc import pipeline
    run = prepared_run(("calibrate", "build"))
    if "correction" in (only or STAGES) and not run.is_done("train_emulator"):  # correction reads this adapter
        pipeline.train(run, "emulator")
    stored = RESULTS / "memory.json"
    kept = []
    if only and stored.exists():
        old = json.loads(stored.read_text())
        kept = [r for r in old["stages"] + old.get("variants", []) + old.get("timing", []) if r["stage"] not in only]
    rows = list(kept)
    for stage in only or ALL_STAGES:
        rows.append(measure(stage, "--steps", str(timing_steps if stage in STEP_STAGES else steps)))
        row = rows[-1]
        timing = f", {row['s_per_step']:.2f} s/step" if "s_per_step" in row else ""
        print(f"{stage}: peak {row['peak_rss_mb']:.0f} MB ({row['above_import_mb']:.0f} MB above import){ledger_text(row)}{timing}", flush=True)
    rows.sort(key=lambda r: ALL_STAGES.index(r["stage"]))
    summary = summarise(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print({k: round(v, 3) for k, v in summary.items() if isinstance(v, float)})


# ---- the weights-dominated model ---------------------------------------------------------------

def big_config(model: str, max_length: int, n_calibration: int, dtype: str) -> dict:
    return {"model": model, "device": "cpu", "dtype": dtype,
            "data": {"n_train": 64, "n_calibration": n_calibration, "n_test": 16, "max_length": max_length},
            "emulator": {"compute_dtype": "float32"}, "lora": {"batch_size": 8, "warmup_steps": 0}}


def big_child(stage: str, out: str, steps: int) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("EMLOC_BENCH_THREADS", "1")))
    from emloc import pipeline
    from emloc.pipeline import lean_emulator_for_training
    run = pipeline.Run(out, progress=False)
    cfg = run.config
    features = training_features(run, steps)
    baseline = rss_mb()
    start = time.perf_counter()
    result = {"stage": stage}
    if stage == "big_build":
        from emloc.cli import main
        main(["build", "--stream", "--out", out])
    elif stage == "big_inference_original":
        from emloc.evaluation import response_loss
        from emloc.data import IGNORE_INDEX
        # the training examples as prompts, in the same batches: the same token counts go through the original model
        prompts = [{"input_ids": f["input_ids"], "labels": [IGNORE_INDEX] * (len(f["input_ids"]) - 1) + f["input_ids"][-1:]}
                   for f in features]
        model = run.fresh_model()
        result["load_peak_mb"] = peak_after_loading()
        with torch.no_grad():
            response_loss(model, prompts, run.tokenizer.pad_token_id, cfg.lora.batch_size)
        result["predicted_peak_mb"] = big_prediction(cfg, "inference", prompts, baseline)
    elif stage == "big_lora_emulator":
        spec = dataclasses.replace(cfg.lora, steps=steps, warmup_steps=0)
        model = lean_emulator_for_training(run)
        result["load_peak_mb"] = peak_after_loading()
        times = timed_training(model, features, spec, cfg.emulator.target_modules, run.tokenizer.pad_token_id)
        result["s_per_step"] = step_seconds(times)
        result["predicted_peak_mb"] = big_prediction(cfg, "lora_emulator", features, baseline)
    elif stage in BIG_STEP_STAGES:
        spec = dataclasses.replace(cfg.lora, steps=steps, warmup_steps=0)
        model = run.fresh_model() if stage == "big_step_original" else lean_emulator_for_training(run)
        result["load_peak_mb"] = peak_after_loading()
        times = timed_training(model, features, spec, cfg.emulator.target_modules, run.tokenizer.pad_token_id,
                               small_heap=False)
        result |= {"s_per_step": step_seconds(times), "step_seconds": times}
    result |= {"peak_rss_mb": peak_mb(), "rss_after_import_mb": baseline, "seconds": time.perf_counter() - start,
               "seq_len": lengths(features)[0]}
    if "load_peak_mb" in result:  # the whole process's peak, and the running peak once the model was in memory
        result["running_peak_mb"] = result["peak_rss_mb"]
        result["peak_rss_mb"] = max(result["load_peak_mb"], result["running_peak_mb"])
        if "predicted_peak_mb" in result:
            result["prediction_error"] = result["predicted_peak_mb"] / result["running_peak_mb"] - 1
    result["above_import_mb"] = result["peak_rss_mb"] - baseline
    return result


def peak_after_loading() -> float:
    """The peak so far (MB), which loading set, then a fresh peak count from now on (Linux ``clear_refs`` 5).

    transformers loads a sharded checkpoint shard by shard, and each shard's file pages and converted copy
    are resident together for a moment: a transient of the loader, not of inference or training."""
    peak = peak_mb()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return peak


def big_prediction(cfg, stage: str, features: list[dict], baseline_mb: float) -> float:
    """The ledger's peak (MB) for the big model's ``stage`` on ``features`` (checkpointing on, as trained)."""
    from emloc.memory import model_config
    seq_len, window = lengths(features)
    return ledger_prediction(model_config(cfg.model), stage, cfg.lora.batch_size, seq_len, window, cfg.dtype,
                             cfg.emulator.ratio, cfg.lora.gradient_checkpointing, baseline_mb)


def big_train_command(out: Path, steps: int) -> dict:
    """``emloc train --on emulator --steps N`` on the big run as a user runs it (default flags: the compact
    heap, threads by the machine's load), its peak RSS measured from outside (a training has no loading
    transient: the emulator is loaded layer by layer)."""
    from bench_readme_commands import trained
    return {"stage": "big_train_command", **trained(out, "emulator", ["--steps", str(steps)])}


def write_big_provenance(path: Path, steps: int, dtype: str, timing: int = 0) -> None:
    """A named-settings record (the model is a local folder the record cannot resolve elsewhere)."""
    import datetime

    from emloc import provenance
    what = (f"the pipeline's default training timed on the original and on the emulator, {timing} rounds, one thread"
            if timing else "`emloc train --on emulator` with default flags")
    record = {"declares": provenance.NAMED,
              "settings": f"benchmarks/bench_memory.py --big: a random 1.5B Llama (make_big_model.py), {dtype}, "
                          f"batch 8, {steps} LoRA steps; {what}",
              "command": f"python benchmarks/bench_memory.py --big runs/big-llama --big-steps {steps} --big-dtype {dtype}"
                         + (f" --big-timing --big-rounds {timing}" if timing else ""),
              "commit": provenance.git_commit(),
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **provenance.environment()}
    provenance.write(path, record)


def big_results_file(dtype: str) -> Path:
    """``memory_big.json`` for float32 (the first measured), ``memory_big_<dtype>.json`` for another dtype."""
    from common import RESULTS
    return RESULTS / ("memory_big.json" if dtype == "float32" else f"memory_big_{dtype}.json")


def stored_rows(path: Path, stage: str) -> list[dict]:
    """``stage``'s row of an earlier ``memory_big.json``, if there is one."""
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text())["stages"] if r["stage"] == stage]


def big_run(folder: str, max_length: int, n_calibration: int, dtype: str):
    """The big model's run directory (``benchmarks/out/big_memory_<dtype>``) with its config saved."""
    from emloc import pipeline
    from emloc.config import RunConfig
    config = RunConfig.from_dict(big_config(folder, max_length, n_calibration, dtype))
    run = pipeline.Run(Path(f"benchmarks/out/big_memory_{dtype}"), config, progress=False)
    run.save_config()
    return run


def big_model(folder: str, steps: int, max_length: int, n_calibration: int, dtype: str) -> None:
    from common import RESULTS

    from emloc import io
    from emloc.streaming import model_size
    run = big_run(folder, max_length, n_calibration, dtype)
    out, config = run.dir, run.config
    rows = []
    for stage in BIG_STAGES:
        if stage == "big_build" and run.is_done("build"):
            print("big_build: reusing the finished streamed build (and its stored measurement)", flush=True)
            rows += stored_rows(big_results_file(dtype), stage)
            continue
        rows.append(measure(stage, "--steps", str(steps), "--big-out", str(out)))
        row = rows[-1]
        print(f"{stage}: peak {row['peak_rss_mb']:.0f} MB in {row['seconds']:.0f} s{ledger_text(row)}", flush=True)
    rows.append(big_train_command(out, steps))
    print(f"big_train_command: peak {rows[-1]['peak_rss_mb']:.0f} MB, {rows[-1]['seconds_per_step']:.1f} s per step",
          flush=True)
    peaks = {r["stage"]: r["peak_rss_mb"] for r in rows}
    running = {r["stage"]: r["running_peak_mb"] for r in rows if "running_peak_mb" in r}
    size = model_size(folder)
    manifest = io.read_json(run.manifest_path("build"))
    summary = {"model": Path(folder).name, "parameters": size["parameters"], "dtype": config.dtype,
               "emulator_parameters": manifest.get("params_emulator"), "ratio": config.emulator.ratio,
               "batch_size": config.lora.batch_size, "lora_steps": steps, "stages": rows,
               "lora_emulator_over_inference_original": running["big_lora_emulator"] / running["big_inference_original"],
               "lora_emulator_over_inference_original_whole_process": (peaks["big_lora_emulator"]
                                                                       / peaks["big_inference_original"]),
               "train_command_over_inference_original": (peaks["big_train_command"]
                                                         / running["big_inference_original"]),
               "train_command_over_inference_original_whole_process": (peaks["big_train_command"]
                                                                       / peaks["big_inference_original"])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    big_results_file(dtype).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_big_provenance(big_results_file(dtype), steps, dtype)
    print({k: v for k, v in summary.items() if k != "stages"})


def median_step_seconds(big_step: dict, stage: str) -> float:
    """The median of ``stage``'s per-round step seconds in a ``big_step_time.json`` (``big_step_original`` or
    ``big_step_emulator``): the figures its ratio of medians divides."""
    return statistics.median(r["s_per_step"] for r in big_step["stages"] if r["stage"] == stage)


def big_timing(folder: str, steps: int, max_length: int, n_calibration: int, dtype: str, rounds: int = 3) -> None:
    """The step time of the pipeline's default training on the big model's emulator over its original's, each
    in a fresh process (the streamed build first, if it is not done), over ``rounds`` rounds whose order
    alternates: ``big_step_time.json`` with each round's ratio and the ratio of the medians."""
    from common import RESULTS
    run = big_run(folder, max_length, n_calibration, dtype)
    if not run.is_done("build"):
        print("big_build: streaming the emulator's build first", flush=True)
        measure("big_build", "--steps", str(steps), "--big-out", str(run.dir))
    rows = []
    for number in range(rounds):
        order = BIG_STEP_STAGES if number % 2 == 0 else BIG_STEP_STAGES[::-1]
        for stage in order:
            rows.append(measure(stage, "--steps", str(steps), "--big-out", str(run.dir)) | {"round": number})
            print(f"round {number}, {stage}: {rows[-1]['s_per_step']:.1f} s per step, peak "
                  f"{rows[-1]['running_peak_mb']:.0f} MB once loaded", flush=True)
    seconds = {stage: [r["s_per_step"] for r in rows if r["stage"] == stage] for stage in BIG_STEP_STAGES}  # by round
    summary = {"model": Path(folder).name, "dtype": dtype, "ratio": run.config.emulator.ratio,
               "batch_size": run.config.lora.batch_size, "lora_steps": steps, "timed_steps": steps - 1,
               "rounds": rounds, "threads": int(os.environ.get("EMLOC_BENCH_THREADS", "1")), "stages": rows,
               "step_time_emulator_over_original_per_round":
                   [e / o for e, o in zip(seconds["big_step_emulator"], seconds["big_step_original"])]}
    summary["step_time_emulator_over_original"] = (median_step_seconds(summary, "big_step_emulator")
                                                   / median_step_seconds(summary, "big_step_original"))
    path = RESULTS / "big_step_time.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_big_provenance(path, steps, dtype, timing=rounds)
    print({k: v for k, v in summary.items() if k != "stages"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4, help="LoRA steps per training stage (the first is not timed)")
    parser.add_argument("--stage", choices=ALL_STAGES + BIG_STAGES + BIG_STEP_STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--big-out", help=argparse.SUPPRESS)
    parser.add_argument("--timing-steps", type=int, default=8,
                        help="LoRA steps of each step-time stage (the first two are not timed)")
    parser.add_argument("--only", nargs="+", choices=ALL_STAGES,
                        help="re-measure these stages, keep the others from memory.json")
    parser.add_argument("--big", help="a model folder from make_big_model.py: measure it instead of the default model")
    parser.add_argument("--big-steps", type=int, default=3)
    parser.add_argument("--big-timing", action="store_true",
                        help="with --big: time a LoRA step on the original and on the emulator (big_step_time.json)")
    parser.add_argument("--big-rounds", type=int, default=3, help="with --big-timing: rounds, the order alternating")
    parser.add_argument("--big-max-length", type=int, default=64)
    parser.add_argument("--big-calibration", type=int, default=8)
    parser.add_argument("--big-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the dtype the big model is loaded and trained in (its files are bfloat16)")
    args = parser.parse_args()
    if args.stage:
        result = big_child(args.stage, args.big_out, args.steps) if args.big_out else child(args.stage, args.steps)
        print(json.dumps(result))
    elif args.big and args.big_timing:
        big_timing(args.big, args.big_steps, args.big_max_length, args.big_calibration, args.big_dtype, args.big_rounds)
    elif args.big:
        big_model(args.big, args.big_steps, args.big_max_length, args.big_calibration, args.big_dtype)
    else:
        default_model(args.steps, args.timing_steps, args.only)


if __name__ == "__main__":
    main()
