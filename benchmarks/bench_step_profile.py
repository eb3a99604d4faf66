"""Where a LoRA training step's time goes, on the emulator and on the original: the torch profiler's self CPU
time of one step (after warm-up), grouped by what the operation serves.

    python benchmarks/bench_step_profile.py [--ratio 0.5] [--steps 3]

The pipeline's default step (activation checkpointing on, non-reentrant; batch 8 of the standard preset;
one thread, ``EMLOC_BENCH_THREADS``), float32. Matrix products are told apart by their shapes: a dimension
equal to the LoRA rank ``r`` is LoRA's, one equal to the vocabulary is the output layer's, any other is a
decoder linear (the original's ``W`` or the emulator's ``u``, ``v``). The standard preset's calibration and
emulator are built in ``benchmarks/out/step_profile_ratio<ratio>`` when missing. Writes
``benchmarks/results/step_profile.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, RESULTS, threads  # noqa: E402

from emloc import pipeline, provenance  # noqa: E402
from emloc.config import PRESETS, RunConfig, merge_dicts  # noqa: E402
from emloc.data import PaddingCollator  # noqa: E402
from emloc.lora import add_lora  # noqa: E402

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
GROUPS = ("decoder linears", "LoRA", "output layer and loss", "attention", "element-wise, norms and other",
          "optimizer")


def group_of(name: str, shapes: list, r: int, vocab: int) -> str:
    """The group an operation's self time belongs to (see the module docstring)."""
    dims = {d for shape in shapes if isinstance(shape, (list, tuple)) for d in shape if isinstance(d, int)}
    if "adam" in name.lower() or "_foreach" in name:
        return "optimizer"
    if "attention" in name or "sdpa" in name:
        return "attention"
    if vocab in dims:
        return "output layer and loss"
    if name in MATMULS:
        return "LoRA" if r in dims else "decoder linears"
    return "element-wise, norms and other"


def profiled_step(model, batch, run) -> dict[str, float]:
    """Seconds of self CPU time per group for one step after two warm-up steps."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    peft_model = add_lora(model, run.config.lora, run.config.emulator.target_modules, seed=0)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    totals: dict[str, float] = defaultdict(float)
    vocab = model.config.vocab_size
    for event in prof.key_averages(group_by_input_shape=True):
        totals[group_of(event.key, event.input_shapes or [], run.config.lora.r, vocab)] += \
            event.self_cpu_time_total / 1e6
    return {group: totals.get(group, 0.0) for group in GROUPS}


def markdown(result: dict) -> str:
    lines = ["| group | original (s) | emulator (s) | emulator / original | share of the original's step |",
             "|---|---:|---:|---:|---:|"]
    original, emulator = result["original"], result["emulator"]
    total_original = sum(original.values())
    for group in GROUPS:
        ratio = emulator[group] / original[group] if original[group] else float("nan")
        lines.append(f"| {group} | {original[group]:.3f} | {emulator[group]:.3f} | {ratio:.2f} "
                     f"| {original[group] / total_original:.2f} |")
    total_emulator = sum(emulator.values())
    lines.append(f"| **step (profiled self time)** | **{total_original:.3f}** | **{total_emulator:.3f}** "
                 f"| **{total_emulator / total_original:.2f}** | 1.00 |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per model (median per group)")
    args = parser.parse_args()
    n_threads = threads()
    overrides = {"device": "cpu", "emulator": {"ratio": args.ratio}}
    config = RunConfig.from_dict(merge_dicts(PRESETS["standard"], overrides))
    run = pipeline.Run(OUT / f"step_profile_ratio{args.ratio}", config, progress=False)
    for stage in ("calibrate", "build"):
        if not run.is_done(stage):
            getattr(pipeline, stage)(run)
    batch = PaddingCollator(run.tokenizer.pad_token_id)(run.features("train")[: run.config.lora.batch_size])
    samples = {"original": [], "emulator": []}
    for _ in range(args.steps):  # alternating, so a slow moment of the machine touches both
        samples["original"].append(profiled_step(run.fresh_model(), batch, run))
        samples["emulator"].append(profiled_step(run.emulator(), batch, run))
    result = {"ratio": args.ratio, "threads": n_threads, "batch_size": run.config.lora.batch_size,
              "tokens": int(batch["attention_mask"].sum()), "profiled_steps": args.steps,
              **{name: {g: statistics.median(s[g] for s in steps) for g in GROUPS}
                 for name, steps in samples.items()}}
    (RESULTS / "step_profile.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "step_profile.md").write_text(markdown(result), encoding="utf-8")
    record = provenance.record({"standard": {"preset": "standard", "emulator": {"ratio": args.ratio}}},
                               command=f"python benchmarks/bench_step_profile.py --ratio {args.ratio} "
                                       f"--steps {args.steps}", threads=n_threads)
    provenance.write([RESULTS / "step_profile.json", RESULTS / "step_profile.md"], record)
    print(markdown(result))


if __name__ == "__main__":
    main()
