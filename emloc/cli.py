"""``emloc`` command line: the whole pipeline (``run``) or one stage at a time, on one run directory."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from emloc import io
from emloc.arguments import OneLineParser, lower_case
from emloc.config import (ALLOCATIONS, CALIBRATIONS, CORRECTION_METHODS, DTYPES, EMULATOR_METHODS, PRECISIONS,
                          PRESETS, RunConfig, merge_dicts, nested)
from emloc.errors import EmlocError
from emloc.stages import STAGES


@dataclass(frozen=True)
class Flag:
    """A command-line option that sets one RunConfig field; its type comes from the dataclass field."""

    name: str
    field: str
    """Dotted RunConfig field, e.g. ``lora.r``."""
    help: str
    choices: Optional[tuple] = None
    zero_is_none: bool = False
    """``0`` sets the field to ``None`` (``--clamp 0``: no clamp)."""

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


FLAGS = (
    Flag("--model", "model", "'default', a Hugging Face id, or a local model folder"),
    Flag("--data", "data.path", "your JSONL or CSV file with prompt and response fields"),
    Flag("--task", "data.task", "a built-in task (instead of --data)"),
    Flag("--keep-duplicates", "data.keep_duplicates", "keep the data file's duplicate records and test "
         "records whose prompt is also in training (removed and counted by default)"),
    Flag("--ratio", "emulator.ratio", "parameter-retention ratio rho in (0, 1)"),
    Flag("--method", "emulator.method", "emulator construction (or a baseline)", choices=EMULATOR_METHODS),
    Flag("--lora-r", "lora.r", "LoRA rank"),
    Flag("--lora-alpha", "lora.alpha", "lora_alpha"),
    Flag("--rslora", "lora.use_rslora", "use rsLoRA scaling"),
    Flag("--steps", "lora.steps", "training steps"),
    Flag("--clamp", "correction.clamp", "correction clamp lambda (0 disables the clamp)", zero_is_none=True),
    Flag("--correction-method", "correction.method",
         "LoRA correction: official (paper), aligned or activation_aware", choices=CORRECTION_METHODS),
    Flag("--calibration", "emulator.calibration", "independent (the paper) or sequential (layer by layer "
         "on the emulator's own inputs)", choices=CALIBRATIONS),
    Flag("--allocation", "emulator.allocation", "uniform ranks (the paper) or global (ranks where they pay, "
         "same parameters)", choices=ALLOCATIONS),
    Flag("--micro-batch-size", "lora.micro_batch_size",
         "examples per pass; passes are accumulated into lora.batch_size"),
    Flag("--memory-budget", "memory_budget", "'inference' or an amount such as 2GB: choose ratio, micro "
         "batch and checkpointing so that the predicted training peak fits"),
    Flag("--seed", "seed", "random seed"),
    Flag("--device", "device", "auto, cpu or cuda"),
    Flag("--dtype", "dtype", "the dtype the model's weights are loaded and stored in", choices=DTYPES),
    Flag("--precision", "lora.precision", "how LoRA training computes: 32-true (float32), bf16-mixed "
         "(bfloat16 autocast; LoRA weights and optimizer stay float32) or auto (bf16-mixed where the CPU or "
         "GPU runs bfloat16 natively)", choices=PRECISIONS),
    Flag("--trust-remote-code", "trust_remote_code", "allow the model's own code"),
)
"""Every config flag of the stage commands, in help order."""


def field_type(dotted: str) -> type:
    """The Python type of a dotted RunConfig field (``Optional[X]`` -> ``X``); a one-line error if there is
    none."""
    cls = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise EmlocError(f"RunConfig has no field {dotted!r}: fix the flag table in emloc.cli")
        cls = hints[part]
    args = [a for a in typing.get_args(cls) if a is not type(None)]
    return args[0] if typing.get_origin(cls) is typing.Union and len(args) == 1 else cls


def add_config_flags(p: argparse.ArgumentParser) -> None:
    for flag in FLAGS:
        kind = field_type(flag.field)
        if kind is bool:
            p.add_argument(flag.name, action="store_true", default=None, help=flag.help)
        else:
            p.add_argument(flag.name, type=lower_case if flag.choices else kind,
                           choices=list(flag.choices) if flag.choices else None, help=flag.help)


def parser() -> argparse.ArgumentParser:
    main = OneLineParser(prog="emloc", description="EMLoC: fine-tune within the inference memory budget.")
    sub = main.add_subparsers(dest="command", required=True)
    helps = {"run": "the whole pipeline"} | {s.cli_command: s.help for s in reversed(STAGES)}
    for name in dict.fromkeys(["run", *(s.cli_command for s in STAGES)]):
        p = sub.add_parser(name, help=helps[name])
        p.add_argument("--out", required=True, help="run directory (created if missing)")
        p.add_argument("--config", help="YAML file with RunConfig fields")
        p.add_argument("--preset", type=lower_case, choices=sorted(PRESETS),
                       help="quick (CI-sized) or standard")
        add_config_flags(p)
        if name == "train":
            p.add_argument("--on", type=lower_case, choices=["emulator", "original", "both"],
                           default="emulator", help="train LoRA on the emulator, the original model, or both")
            p.add_argument("--processes", type=int, default=1,
                           help="training processes (DDP through torchrun; gloo on CPU)")
        if name == "build":
            p.add_argument("--stream", action="store_true",
                           help="calibrate and build one decoder layer at a time from the safetensors shards "
                                "(for models too large for memory)")
        if name == "run":
            p.add_argument("--force", action="store_true", help="redo every stage")
    sweep = sub.add_parser("sweep", help="a grid of runs with seed-level tables (see emloc.sweeps)")
    sweep.add_argument("--grid", required=True, help="YAML file with base, grid and optional variants")
    sweep.add_argument("--out", required=True,
                       help="sweep directory: one run directory per point (resumable)")
    sweep.add_argument("--tables",
                       help="where to write the CSV/Markdown tables and figure (default OUT/tables)")
    sweep.add_argument("--tables-only", action="store_true",
                       help="only recompute the tables from finished points")
    sweep.add_argument("--reuse", nargs="+", default=[], metavar="RUN",
                       help="finished run directories whose stages are reused where their fingerprints match")
    for name, (_, text) in DELEGATED.items():  # listed in --help; their own parsers read the arguments
        sub.add_parser(name, help=text, add_help=False)
    return main


DELEGATED = {
    "export": ("emloc.export", "executed notebooks as static HTML that works offline (see emloc.export)"),
    "bundle": ("emloc.bundle", "pack finished runs for a class, or unpack a class bundle (see emloc.bundle)"),
    "denoiser": ("emloc.denoiser", "pretrain the base digits denoiser (a diffusion transformer) once"),
}
"""Subcommands with a parser of their own: ``emloc export ...`` is ``python -m emloc.export ...``."""


def flag_overrides(args: argparse.Namespace) -> dict:
    """The RunConfig overrides of the flags given (absent flags are ``None`` and override nothing)."""
    explicit: dict = {}
    for flag in FLAGS:
        value = getattr(args, flag.dest, None)
        if value is not None:
            explicit = merge_dicts(explicit,
                                   nested(flag.field, None if flag.zero_is_none and value == 0 else value))
    return explicit


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Stored run config < --config file < --preset < explicit flags."""
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
    return RunConfig.from_dict(merge_dicts(raw, flag_overrides(args)))


def planned(run, command: str):
    """With ``memory_budget`` set, print the memory plan (sized by the run's training data) and give ``run``
    the config it chooses (ratio, micro batch, checkpointing) for the commands that build or train; an
    impossible budget is a one-line error."""
    if run.config.memory_budget is None or command not in ("run", "build", "train"):
        return run
    from emloc.memory import plan_for_run
    from emloc.model_tasks import check_plannable
    check_plannable(run.task)
    plan = plan_for_run(run.config, run.features("train"))
    print(plan, flush=True)
    run.config = plan.apply(run.config)
    return run


def execute(args: argparse.Namespace) -> int:
    from emloc import pipeline  # heavy imports only after the arguments parse

    if args.command == "sweep":
        return execute_sweep(args)
    run = planned(pipeline.Run(args.out, config_from_args(args)), args.command)
    start = time.perf_counter()
    if args.command == "run":
        results = pipeline.run_pipeline(run, force=args.force)
    elif args.command == "build":
        _build(run, args.stream)
    elif args.command == "train":
        for which in (["emulator", "original"] if args.on == "both" else [args.on]):
            _train(run, which, args.processes)
    else:
        pipeline.STAGE_FUNCTIONS[args.command](run)
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
        sweeps.run_sweep(spec, args.out,
                         on_point=lambda i, n, point: print(f"point {i + 1}/{n}: {point}", flush=True),
                         reuse=args.reuse)
    tables = sweeps.write_tables(args.out, args.tables, measured=not args.tables_only)
    print(tables["summary"].to_string(float_format=lambda x: f"{x:.3f}"))
    print(tables["gap"].to_string(float_format=lambda x: f"{x:.3f}"))
    print(tables["correction"].to_string(float_format=lambda x: f"{x:.3f}"))
    print(tables["loss"].to_string(float_format=lambda x: f"{x:.3f}"))
    for sentence in tables["baselines"].get("sentence", []):
        print(sentence)
    print(f"sweep finished in {time.perf_counter() - start:.1f} s; runs in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        import importlib
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    try:
        return execute(parser().parse_args(argv))
    except EmlocError as error:
        print(f"emloc: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emloc: interrupted; finished stages are kept and the next run resumes from them",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
