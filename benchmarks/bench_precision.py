"""LoRA training step time on the emulator, 32-true vs bf16-mixed (``lora.precision``); each one's peak RSS.

A step is what ``emloc train`` does per optimizer step: forward + backward (checkpointed decoder layers, as
``lora.gradient_checkpointing`` does by default) + AdamW on the LoRA weights, on one fixed batch of training
examples of the benchmark run (batch 8, ratio 0.5 emulator, one torch thread). bf16-mixed runs forward and
backward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the context accelerate enters for
``TrainingArguments(bf16=True)``; the LoRA weights and AdamW stay float32, and so do the frozen weights (as in
``emloc``). A third arm, ``bf16-mixed_bf16_weights``, casts the frozen weights to bfloat16 once (the
alternative ``emloc`` does not take; ``--dtype bfloat16`` gets it) to show what that would add.

All arms run in one process, step by step, in an order reversed every round, so load changes on a shared
machine hit them alike; the median of the timed steps is reported. Peak RSS: each arm in a fresh subprocess,
the high-water mark (VmHWM) reset after the emulator is loaded, so it is the training steps' own peak.

    python benchmarks/bench_precision.py [--warmup 3] [--steps 5] [--rss-steps 3] [--ratio 0.5]
"""
import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import BENCH_CONFIG, RESULTS, prepared_run, threads  # noqa: E402

from emloc import io, provenance  # noqa: E402
from emloc.data import PaddingCollator  # noqa: E402
from emloc.lora import add_lora, checkpointing_arguments  # noqa: E402
from emloc.pipeline import lean_emulator_for_training  # noqa: E402
from emloc.precision import cpu_bf16_features  # noqa: E402

ARMS = {"32-true": ("32-true", False), "bf16-mixed": ("bf16-mixed", False),
        "bf16-mixed_bf16_weights": ("bf16-mixed", True)}
"""arm -> (precision, frozen weights cast to bfloat16)."""
OUT = RESULTS / "precision" / "step_time.json"


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Trainee:
    """The emulator with fresh LoRA, checkpointing as ``train_lora`` turns it on, AdamW, one fixed batch."""

    def __init__(self, run, bf16_weights: bool = False):
        spec = run.config.lora
        emulator = lean_emulator_for_training(run)
        self.model = add_lora(emulator, spec, run.config.emulator.target_modules, seed=0)
        if bf16_weights:
            for parameter in self.model.parameters():
                if not parameter.requires_grad:
                    parameter.data = parameter.data.to(torch.bfloat16)
        checkpointing = checkpointing_arguments(self.model, spec.gradient_checkpointing)
        if checkpointing:
            self.model.get_base_model().activation_checkpointing_enable(
                checkpointing["activation_checkpointing_kwargs"])
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=spec.learning_rate)
        self.batch = PaddingCollator(run.tokenizer.pad_token_id)(run.features("train")[: spec.batch_size])
        self.checkpointing = bool(checkpointing)

    def step(self, precision: str) -> tuple[float, float]:
        """One optimizer step; (seconds, loss)."""
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        start = time.perf_counter()
        with autocast:
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss)

    def float32_state(self) -> bool:
        """Whether the LoRA weights and AdamW's state are all float32."""
        lora = [p for p in self.model.parameters() if p.requires_grad]
        moments = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return all(t.dtype == torch.float32 for t in lora + moments)


def child(arm: str, steps: int, ratio: float) -> None:
    """One arm alone in this (fresh) process: print its training peak RSS as JSON."""
    threads()
    precision, bf16_weights = ARMS[arm]
    trainee = Trainee(prepared_run(("calibrate", "build"), ratio), bf16_weights)
    load_peak = status_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")  # reset VmHWM to the current RSS
    before = status_mb("VmRSS")
    seconds = [trainee.step(precision)[0] for _ in range(steps)]
    print(json.dumps({"rss_before_steps_mb": before, "peak_rss_mb": status_mb("VmHWM"),
                      "load_peak_rss_mb": load_peak, "steps": steps,
                      "s_per_step": statistics.median(seconds)}))


def peak_rss(arm: str, steps: int, ratio: float) -> dict:
    command = [sys.executable, str(Path(__file__)), "--child", arm, "--rss-steps", str(steps),
               "--ratio", str(ratio)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each arm")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each arm")
    parser.add_argument("--rss-steps", type=int, default=3, help="steps of each peak-RSS process (0: none)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rss_steps, args.ratio)
    n_threads = threads()
    run = prepared_run(("calibrate", "build"), args.ratio)
    trainee, bf16_trainee = Trainee(run), Trainee(run, bf16_weights=True)
    steppers = {arm: (bf16_trainee if bf16_weights else trainee, precision)
                for arm, (precision, bf16_weights) in ARMS.items()}
    times = {arm: [] for arm in ARMS}
    for i in range(args.warmup + args.steps):
        for arm in (list(ARMS) if i % 2 == 0 else list(ARMS)[::-1]):  # reversed every round
            model, precision = steppers[arm]
            seconds, _ = model.step(precision)
            if i >= args.warmup:
                times[arm].append(seconds)
        print(f"round {i + 1}/{args.warmup + args.steps}: "
              + ", ".join(f"{arm} {times[arm][-1]:.2f} s" for arm in ARMS if times[arm]), flush=True)
    median = {arm: statistics.median(times[arm]) for arm in ARMS}
    spec = run.config.lora
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": provenance.cpu_model(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_bf16_features(),
        "settings": {"model": run.config.model, "ratio": args.ratio, "batch_size": spec.batch_size,
                     "tokens": int(trainee.batch["attention_mask"].sum()),
                     "gradient_checkpointing": trainee.checkpointing, "lora_r": spec.r,
                     "lora_alpha": spec.alpha,
                     "target_modules": run.config.emulator.target_modules, "threads": n_threads,
                     "warmup_steps": args.warmup, "timed_steps": args.steps,
                     "order": "one process, step by step, order reversed every round"},
        "arms": {arm: {"precision": precision, "frozen_weights": "bfloat16" if bf16_weights else "float32"}
                 for arm, (precision, bf16_weights) in ARMS.items()},
        "s_per_step": median,
        "step_times": times,
        "speedup_over_32_true": {arm: median["32-true"] / median[arm] for arm in ARMS},
        "lora_and_optimizer_state_float32": trainee.float32_state() and bf16_trainee.float32_state(),
    }
    del trainee, bf16_trainee, steppers
    if args.rss_steps:
        result["peak_rss"] = {arm: peak_rss(arm, args.rss_steps, args.ratio) for arm in ARMS}
    io.write_json(OUT, result)
    command = (f"python benchmarks/bench_precision.py --warmup {args.warmup} --steps {args.steps} "
               f"--rss-steps {args.rss_steps} --ratio {args.ratio}")
    overrides = {**BENCH_CONFIG, "emulator": {"ratio": args.ratio}}
    configs = {arm: {**overrides, "lora": {**overrides["lora"], "precision": precision}}
               for arm, (precision, _) in ARMS.items() if arm in ("32-true", "bf16-mixed")}
    provenance.write(OUT, provenance.record(configs, command=command))
    for arm in ARMS:
        rss = result.get("peak_rss", {}).get(arm)
        print(f"{arm:24s} {median[arm]:.3f} s/step  x{result['speedup_over_32_true'][arm]:.2f}"
              + (f"  training peak RSS {rss['peak_rss_mb']:.0f} MB "
                 f"(before {rss['rss_before_steps_mb']:.0f} MB)" if rss else ""))


if __name__ == "__main__":
    main()
