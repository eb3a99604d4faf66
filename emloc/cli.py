"""``emloc`` command line: the whole pipeline (``run``) or one stage at a time, on one run directory."""
from __future__ import annotations

import argparse
import sys
import time

from emloc import io
from emloc.config import EMULATOR_METHODS, PRESETS, RunConfig, merge_dicts
from emloc.errors import EmlocError

STAGES = ["run", "calibrate", "build", "train", "correct", "evaluate"]


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="emloc", description="EMLoC: fine-tune within the inference memory budget.")
    sub = main.add_subparsers(dest="command", required=True)
    helps = {"run": "the whole pipeline", "calibrate": "stage 1a: calibration statistics",
             "build": "stage 1b: the emulator", "train": "stage 2: LoRA on the emulator (or the original model)",
             "correct": "stage 3: LoRA correction", "evaluate": "evaluate the five variants"}
    for name in STAGES:
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("--out", required=True, help="run directory (created if missing)")
        p.add_argument("--config", help="YAML file with RunConfig fields")
        p.add_argument("--preset", choices=sorted(PRESETS), help="quick (CI-sized) or standard")
        p.add_argument("--model", help="'default', a Hugging Face id, or a local model folder")
        p.add_argument("--data", help="your JSONL or CSV file with prompt and response fields")
        p.add_argument("--task", help="a built-in task (instead of --data)")
        p.add_argument("--ratio", type=float, help="parameter-retention ratio rho in (0, 1)")
        p.add_argument("--method", choices=list(EMULATOR_METHODS), help="emulator construction (or a baseline)")
        p.add_argument("--lora-r", type=int, help="LoRA rank")
        p.add_argument("--lora-alpha", type=float, help="lora_alpha")
        p.add_argument("--rslora", action="store_true", default=None, help="use rsLoRA scaling")
        p.add_argument("--steps", type=int, help="training steps")
        p.add_argument("--clamp", type=float, help="correction clamp lambda (0 disables the clamp)")
        p.add_argument("--correction-method", choices=["official", "aligned", "activation_aware"],
                       help="LoRA correction: official (paper), aligned or activation_aware")
        p.add_argument("--seed", type=int, help="random seed")
        p.add_argument("--device", help="auto, cpu or cuda")
        p.add_argument("--dtype", help="float32, bfloat16 or float16")
        p.add_argument("--trust-remote-code", action="store_true", default=None, help="allow the model's own code")
        if name == "train":
            p.add_argument("--on", choices=["emulator", "original", "both"], default="emulator",
                           help="train LoRA on the emulator, the original model, or both")
            p.add_argument("--processes", type=int, default=1,
                           help="training processes (DDP through torchrun; gloo on CPU)")
        if name == "build":
            p.add_argument("--stream", action="store_true",
                           help="calibrate and build one decoder layer at a time from the safetensors shards "
                                "(for models too large for memory)")
        if name == "run":
            p.add_argument("--force", action="store_true", help="redo every stage")
    sweep = sub.add_parser("sweep", help="a grid of runs with bootstrap tables (see emloc.sweeps)")
    sweep.add_argument("--grid", required=True, help="YAML file with base, grid and optional variants")
    sweep.add_argument("--out", required=True, help="sweep directory: one run directory per point (resumable)")
    sweep.add_argument("--tables", help="where to write the CSV/Markdown tables and figure (default OUT/tables)")
    sweep.add_argument("--tables-only", action="store_true", help="only recompute the tables from finished points")
    sweep.add_argument("--reuse", nargs="+", default=[], metavar="RUN",
                       help="finished run directories whose stages are reused where their fingerprints match")
    return main


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Stored run config < --config file < --preset < explicit flags."""
    from pathlib import Path
    stored = Path(args.out) / "config.yaml"
    raw: dict = io.read_yaml(stored) if stored.exists() and not args.config else {}
    if args.config:
        raw = io.read_yaml(args.config) or {}
        if not isinstance(raw, dict):
            raise EmlocError(f"config file {args.config} must hold a mapping of keys to values")
    if raw:
        try:
            RunConfig.from_dict(raw)
        except EmlocError as error:  # name the file that holds the bad value
            raise EmlocError(f"{args.config or stored}: {error}") from None
    if args.preset:
        raw = merge_dicts(raw, PRESETS[args.preset])
    flags = {
        "model": args.model, "seed": args.seed, "device": args.device, "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        "data": {"path": args.data, "task": args.task},
        "emulator": {"ratio": args.ratio, "method": args.method},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "use_rslora": args.rslora, "steps": args.steps},
        "correction": {"clamp": None if args.clamp == 0 else args.clamp, "method": args.correction_method},
    }
    explicit = _drop_none(flags)
    if args.clamp == 0:
        explicit.setdefault("correction", {})["clamp"] = None
    return RunConfig.from_dict(merge_dicts(raw, explicit))


def _drop_none(tree: dict) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def execute(args: argparse.Namespace) -> int:
    from emloc import pipeline  # heavy imports only after the arguments parse

    if args.command == "sweep":
        return execute_sweep(args)
    run = pipeline.Run(args.out, config_from_args(args))
    start = time.perf_counter()
    if args.command == "run":
        results = pipeline.run_pipeline(run, force=args.force)
    elif args.command == "calibrate":
        pipeline.calibrate(run)
    elif args.command == "build":
        _build(run, args.stream)
    elif args.command == "train":
        for which in (["emulator", "original"] if args.on == "both" else [args.on]):
            _train(run, which, args.processes)
    elif args.command == "correct":
        pipeline.correct(run)
    elif args.command == "evaluate":
        pipeline.evaluate(run)
    if args.command in ("run", "evaluate"):
        results = run.results()
        print(pipeline.results_table(results).to_string(float_format=lambda x: f"{x:.3f}"))
        print("stage seconds:", results["stage_seconds"])
    print(f"{args.command} finished in {time.perf_counter() - start:.1f} s; artifacts in {run.dir}")
    return 0


def _build(run, stream: bool) -> None:
    from emloc import pipeline, streaming

    if stream:
        streaming.stream_build(run)
    else:
        pipeline.build(run)


def _train(run, which: str, processes: int) -> None:
    from emloc import pipeline
    from emloc.distributed import train_distributed

    if processes > 1:
        run.save_config()
        train_distributed(run.dir, which, processes)
    else:
        pipeline.train(run, which)


def execute_sweep(args: argparse.Namespace) -> int:
    from emloc import sweeps
    spec = sweeps.load_spec(args.grid)
    start = time.perf_counter()
    if not args.tables_only:
        sweeps.run_sweep(spec, args.out, on_point=lambda i, n, point: print(f"point {i + 1}/{n}: {point}", flush=True),
                         reuse=args.reuse)
    tables = sweeps.write_tables(args.out, args.tables)
    print(tables["summary"].to_string(float_format=lambda x: f"{x:.3f}"))
    print(tables["gap"].to_string(float_format=lambda x: f"{x:.3f}"))
    print(tables["correction"].to_string(float_format=lambda x: f"{x:.3f}"))
    print(tables["loss"].to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"sweep finished in {time.perf_counter() - start:.1f} s; runs in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return execute(args)
    except EmlocError as error:
        print(f"emloc: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emloc: interrupted; finished stages are kept and the next run resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
