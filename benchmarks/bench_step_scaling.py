"""How the step-time ratio (emulator / original) moves with the model's width: the pipeline's default LoRA
step on Llama-shaped stacks of a few decoder layers, extrapolated to the full depth.

    python benchmarks/bench_step_scaling.py [--shapes default big 8b] [--steps 4] [--rounds 3]
    python benchmarks/bench_step_scaling.py --summarize     # refit and re-render the stored result

A step's compute is additive over identical decoder layers, so its time is ``t(k) = a + b k`` for a stack of
``k`` layers: ``a`` is the embedding, the output layer, the loss and the optimizer, ``b`` one layer's forward,
recompute and backward. Stacks of 1, 2 and 3 layers are timed (6, 12 and 18 for the default model, whose
layers are fast; ``--layers`` sets one list for all). ``a`` and ``b`` are fitted by least squares per model
(and per round, for the rounds' spread), and the full depth ``L`` is predicted as ``a + b L``. The shapes:

- ``default``: the default model's own config (SmolLM2-135M, 30 layers); with ``--check-full`` its full
  depth is also timed, a check of the extrapolation.
- ``big``: the 1.5B model of ``make_big_model.py`` (30 layers); its full depth is timed by
  ``bench_memory.py --big-timing`` (``big_step_time.json``, real weights), the check here.
- ``8b``: Llama-3-8B's decoder (hidden 4096, MLP 14336, 32 heads, 8 key/value heads, 32 layers) with the
  default tokenizer's vocabulary (49152, not Llama-3's 128256: only the intercept ``a`` depends on it).

Weights are random (a step's time does not depend on their values). The emulator factors exactly the
linears the pipeline's build factors (the last layer's MLP output projection stays dense, as officially),
each at the rank of ``emulator.ratio``, with random factors of that rank. Training is the pipeline's own
(``emloc.lora.train_lora``: Trainer, activation checkpointing, the response-window loss, AdamW) on the
standard preset's training examples, one thread (``EMLOC_BENCH_THREADS``), float32; ``--steps`` steps of
which the first is a warm-up. Rounds alternate which model goes first. Writes
``benchmarks/results/step_scaling.{json,md}``.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import median_step_seconds, step_seconds, timed_training  # noqa: E402
from common import OUT, RESULTS, threads  # noqa: E402
from make_big_model import BIG_CONFIG  # noqa: E402

from emloc import pipeline, provenance  # noqa: E402
from emloc.calibration import target_linears  # noqa: E402
from emloc.config import PRESETS, RunConfig, merge_dicts  # noqa: E402
from emloc.families import last_block_output, linear_shape  # noqa: E402
from emloc.lowrank import rank_from_ratio  # noqa: E402
from emloc.models import contiguous_output_layer_input, resolve_model_path  # noqa: E402
from emloc.svd_emulator import swap_in_low_rank  # noqa: E402
from emloc.targets import excluded_modules, ratio_for  # noqa: E402

LLAMA3_8B_DECODER = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
MODELS = ("original", "emulator")
SHAPE_LABELS = {"default": "SmolLM2-135M (the default model)", "big": "1.5B Llama (make_big_model.py)",
                "8b": "Llama-3-8B"}
LAYER_COUNTS = {"default": [6, 12, 18], "big": [1, 2, 3], "8b": [1, 2, 3]}
"""Stack depths timed per shape: a narrow layer takes a few hundredths of a second, so the default model's
slope needs a wider span to stand out of the noise."""


def shape_config(shape: str) -> dict:
    """The transformers config (as a dict) of a named shape, at its full depth."""
    if shape == "default":
        return AutoConfig.from_pretrained(resolve_model_path("default")).to_dict()
    if shape == "big":
        return dict(BIG_CONFIG)
    if shape == "8b":
        return {**BIG_CONFIG, **LLAMA3_8B_DECODER}
    raise SystemExit(f"unknown shape {shape!r}: use default, big or 8b")


def stack(config: dict, layers: int, kind: str, emulator_config, seed: int = 0) -> torch.nn.Module:
    """A random float32 Llama of ``layers`` decoder layers; for ``kind == "emulator"`` its targeted linears
    (as the build picks them) replaced by random rank-``r`` factors."""
    torch.manual_seed(seed)
    shape = LlamaConfig(**{**config, "num_hidden_layers": layers, "dtype": "float32"})
    model = LlamaForCausalLM(shape).float()
    contiguous_output_layer_input(model)
    if kind == "emulator":
        linears = target_linears(model, emulator_config.target_modules)
        for name in excluded_modules(linears, emulator_config, last_block_output(model)):
            del linears[name]
        u, v = {}, {}
        for name, linear in linears.items():
            out_features, in_features = linear_shape(linear)
            r = rank_from_ratio(ratio_for(name, emulator_config), out_features, in_features)
            scale = float(linear.weight.detach().std()) ** 0.5 / r ** 0.25  # u v has the weights' scale
            u[name] = torch.randn(out_features, r) * scale
            v[name] = torch.randn(r, in_features) * scale
        swap_in_low_rank(model, u, v)
    return model.train()


def fit_line(layers: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``seconds = a + b * layers`` (at least two distinct layer counts)."""
    if len(set(layers)) < 2:
        raise ValueError("fit_line needs at least two distinct layer counts")
    b, a = np.polyfit(np.asarray(layers, float), np.asarray(seconds, float), 1)
    return float(a), float(b)


def fitted(rows: list[dict], model: str, round_number: int | None = None) -> tuple[float, float]:
    """``(a, b)`` of ``model``'s rows (of one round, or of all rounds when ``round_number`` is None)."""
    mine = [r for r in rows if r["model"] == model and round_number in (None, r["round"])]
    return fit_line([r["layers"] for r in mine], [r["s_per_step"] for r in mine])


def full_depth(rows: list[dict], depth: int) -> dict:
    """Per model: the fitted intercept and per-layer seconds over all rounds, the predicted full-depth step,
    and the emulator/original ratios (full depth, per layer, and each round's full-depth ratio)."""
    result = {}
    for model in MODELS:
        a, b = fitted(rows, model)
        result[model] = {"intercept_s": a, "per_layer_s": b, "full_depth_s": a + b * depth}
    per_round = []
    for number in sorted({r["round"] for r in rows}):
        (a_e, b_e), (a_o, b_o) = fitted(rows, "emulator", number), fitted(rows, "original", number)
        per_round.append((a_e + b_e * depth) / (a_o + b_o * depth))
    result["ratio_full_depth"] = result["emulator"]["full_depth_s"] / result["original"]["full_depth_s"]
    result["ratio_per_layer"] = result["emulator"]["per_layer_s"] / result["original"]["per_layer_s"]
    result["ratio_full_depth_per_round"] = per_round
    return result


def timed(config: dict, layers: int, kind: str, run, steps: int) -> dict:
    model = stack(config, layers, kind, run.config.emulator)
    spec = dataclasses.replace(run.config.lora, steps=steps, warmup_steps=0)
    features = run.features("train")[: spec.batch_size * steps]
    times = timed_training(model, features, spec, run.config.emulator.target_modules,
                           run.tokenizer.pad_token_id, small_heap=False)
    del model
    gc.collect()
    return {"model": kind, "layers": layers, "s_per_step": step_seconds(times), "step_seconds": times}


def measure_shape(shape: str, layer_counts: list[int], run, steps: int, rounds: int,
                  check_full: bool) -> dict:
    config = shape_config(shape)
    depth = config["num_hidden_layers"]
    rows = []
    for number in range(rounds):
        order = MODELS if number % 2 == 0 else MODELS[::-1]
        for layers in layer_counts:
            for kind in order:
                rows.append(timed(config, layers, kind, run, steps) | {"round": number})
                print(f"{shape}, round {number}, {layers} layers, {kind}: "
                      f"{rows[-1]['s_per_step']:.3f} s per step", flush=True)
    result = {"label": SHAPE_LABELS.get(shape, shape), "hidden_size": config["hidden_size"],
              "intermediate_size": config["intermediate_size"],
              "num_key_value_heads": config["num_key_value_heads"], "vocab_size": config["vocab_size"],
              "depth": depth, "rows": rows, **full_depth(rows, depth)}
    if check_full:
        measured = {kind: timed(config, depth, kind, run, steps) for kind in MODELS}
        seconds = {kind: measured[kind]["s_per_step"] for kind in MODELS}
        result["measured_full_depth"] = {**seconds, "ratio": seconds["emulator"] / seconds["original"]}
    return result


def big_check() -> dict | None:
    """The full-depth 1.5B measurement of ``bench_memory.py --big-timing`` (real weights), if stored."""
    path = RESULTS / "big_step_time.json"
    if not path.exists():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    seconds = {kind: median_step_seconds(stored, f"big_step_{kind}") for kind in MODELS}
    return {**seconds, "ratio": stored["step_time_emulator_over_original"], "source": "big_step_time.json"}


def summarize(path: Path) -> None:
    """Refit the stored rows and rewrite ``step_scaling.{json,md}`` (the provenance record stays)."""
    result = json.loads(path.read_text(encoding="utf-8"))
    for shape, s in result["shapes"].items():
        s |= {"label": SHAPE_LABELS.get(shape, shape), **full_depth(s["rows"], s["depth"])}
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["| shape | hidden | MLP | layers | original s/step | emulator s/step | emulator / original | "
             "per round | per layer | measured at full depth |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for shape, s in result["shapes"].items():
        check = s.get("measured_full_depth")
        measured = (f"{check['original']:.2f} s / {check['emulator']:.2f} s = {check['ratio']:.3f}"
                    + (f" (`{check['source']}`)" if "source" in check else "")) if check else ""
        rounds = ", ".join(f"{r:.3f}" for r in s["ratio_full_depth_per_round"])
        lines.append(f"| {s['label']} | {s['hidden_size']} | {s['intermediate_size']} "
                     f"| {s['depth']} "
                     f"| {s['original']['full_depth_s']:.2f} | {s['emulator']['full_depth_s']:.2f} "
                     f"| {s['ratio_full_depth']:.3f} | {rounds} | {s['ratio_per_layer']:.3f} | {measured} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["default", "big", "8b"])
    parser.add_argument("--layers", nargs="+", type=int,
                        help="stack depths for every shape (default: per shape)")
    parser.add_argument("--steps", type=int, default=4, help="steps per measurement, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check-full", nargs="*", default=["default"],
                        help="shapes whose full depth is also timed (a check of the extrapolation)")
    parser.add_argument("--summarize", action="store_true",
                        help="refit and re-render the stored step_scaling.json (no model run)")
    args = parser.parse_args()
    if args.summarize:
        return summarize(RESULTS / "step_scaling.json")
    n_threads = threads()
    config = RunConfig.from_dict(merge_dicts(PRESETS["standard"], {"device": "cpu"}))
    run = pipeline.Run(OUT / "step_scaling", config, progress=False)
    layers = {shape: args.layers or LAYER_COUNTS.get(shape, [1, 2, 3]) for shape in args.shapes}
    shapes = {shape: measure_shape(shape, layers[shape], run, args.steps, args.rounds,
                                   shape in args.check_full) for shape in args.shapes}
    stored_big = big_check() if "big" in shapes and "measured_full_depth" not in shapes["big"] else None
    if stored_big:
        shapes["big"]["measured_full_depth"] = stored_big
    result = {"ratio": config.emulator.ratio, "batch_size": config.lora.batch_size, "threads": n_threads,
              "dtype": "float32", "steps": args.steps, "timed_steps": args.steps - 1, "layers": layers,
              "rounds": args.rounds, "shapes": shapes}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_scaling.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "step_scaling.md").write_text(markdown(result), encoding="utf-8")
    command = (f"python benchmarks/bench_step_scaling.py --shapes {' '.join(args.shapes)}"
               + (f" --layers {' '.join(map(str, args.layers))}" if args.layers else "")
               + f" --steps {args.steps} --rounds {args.rounds} --check-full {' '.join(args.check_full)}")
    record = provenance.record({"standard": {"preset": "standard"}}, command=command, threads=n_threads,
                               settings="random-weight Llama stacks of a few decoder layers, the pipeline's "
                                        "training (checkpointing on, glibc's own heap), float32, "
                                        "extrapolated per layer")
    provenance.write([RESULTS / "step_scaling.json", RESULTS / "step_scaling.md"], record)
    print(markdown(result))


if __name__ == "__main__":
    main()
