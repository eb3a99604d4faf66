"""The registry of stages and evaluated variants: the one place that lists them.

The pipeline (:func:`emloc.pipeline.run_pipeline`), :func:`emloc.notebook.ensure`, the CLI and the
sweeps all loop over :data:`STAGES`; fingerprints (:func:`emloc.rundir.fingerprint`) read each
stage's config sections from it. A new stage is one :class:`Stage` entry (and its function in
:mod:`emloc.pipeline`); a new evaluated variant is one :class:`Variant` entry in :data:`VARIANT_SPECS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from emloc.errors import EmlocError

LossCallback = Callable[[str, int, float], None]
"""``on_loss(which, step, loss)`` with ``which`` = 'emulator' or 'original'."""


def _pipeline():
    from emloc import pipeline  # the stage functions live there, and pipeline imports this registry
    return pipeline


def tagged(on_loss: LossCallback | None, which: str) -> Callable[[int, float], None] | None:
    """``on_loss(which, step, loss)`` -> the ``on_loss(step, loss)`` that :func:`emloc.pipeline.train` calls."""
    return None if on_loss is None else (lambda step, loss: on_loss(which, step, loss))


def _train_on(which: str) -> Callable:
    return lambda run, on_loss=None: _pipeline().train(run, which, tagged(on_loss, which))


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    """Stages that must be finished first, in the order they run."""
    paths: tuple[str, ...]
    """What it writes, relative to the run directory (besides ``manifests/<name>.json``)."""
    config: Optional[tuple[str, ...]]
    """RunConfig sections its fingerprint covers on top of model, dtype, seed, data and the targets;
    ``None``: the whole config."""
    command: str
    """The ``emloc`` command that makes it (shown in 'run `emloc <command> --out DIR`' hints)."""
    help: str
    """One line for the CLI's help."""
    run: Callable
    """``run(run, on_loss=None)``: the stage function of :mod:`emloc.pipeline` on a :class:`~emloc.pipeline.Run`."""
    uses_calibration: bool = True
    """Whether ``data.n_calibration`` is part of its fingerprint (LoRA on the original never sees that subset)."""
    adapter: Optional[str] = None
    """The adapter folder (``emloc.rundir.ADAPTERS`` key) whose provenance must match for the stage to count as done."""
    linkable: bool = True
    """Whether a sweep may hard-link it from another run with the same fingerprint."""
    always: bool = False
    """Whether :func:`emloc.pipeline.run_pipeline` redoes it even when finished."""

    @property
    def cli_command(self) -> str:
        """The subcommand alone (``train`` for ``train --on original``)."""
        return self.command.split()[0]


STAGES: tuple[Stage, ...] = (
    Stage("calibrate", (), ("calibration",), (), "calibrate", "stage 1a: calibration statistics",
          lambda run, on_loss=None: _pipeline().calibrate(run)),
    Stage("build", ("calibrate",), ("emulator",), ("emulator",), "build", "stage 1b: the emulator",
          lambda run, on_loss=None: _pipeline().build(run)),
    Stage("fidelity", ("calibrate", "build"), ("fidelity.json",), ("emulator", "evaluation"), "fidelity",
          "the emulator's end-to-end fidelity: next-token KL and residual-stream drift per layer",
          lambda run, on_loss=None: _pipeline().fidelity(run)),
    Stage("train_emulator", ("calibrate", "build"),
          ("adapters/emulator_lora", "adapters/recovered_lora", "training/emulator_lora.json"),
          ("emulator", "lora"), "train", "stage 2: LoRA on the emulator (or the original model)",
          _train_on("emulator"), adapter="emulator"),
    Stage("train_original", (), ("adapters/full_lora", "training/full_lora.json"), ("lora",),
          "train --on original", "stage 2: LoRA on the emulator (or the original model)",
          _train_on("original"), uses_calibration=False, adapter="original"),
    Stage("correct", ("calibrate", "build", "train_emulator"), ("adapters/corrected", "correction"),
          ("emulator", "lora", "correction"), "correct", "stage 3: LoRA correction",
          lambda run, on_loss=None: _pipeline().correct(run), adapter="corrected"),
    Stage("evaluate", ("calibrate", "build", "train_emulator", "train_original", "correct"), ("results.json",),
          None, "evaluate", "evaluate the six variants", lambda run, on_loss=None: _pipeline().evaluate(run),
          linkable=False, always=True),
)
STAGE = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    if name not in STAGE:
        raise EmlocError(f"stage {name!r} is unknown: use one of {', '.join(STAGE)}")
    return STAGE[name]


def with_needs(names) -> list[Stage]:
    """``names`` and every stage they need, in registry (run) order."""
    wanted = set()
    for name in names:
        wanted |= {name, *stage(name).needs}
    return [s for s in STAGES if s.name in wanted]


@dataclass(frozen=True)
class Variant:
    name: str
    stage: str
    """The stage whose fingerprint fixes its result (with the evaluation settings); it is evaluated by default
    once that stage is finished."""
    adapter: Optional[str] = None
    """The adapter (``emloc.rundir.ADAPTERS`` key) it checks and loads; ``None``: the plain original model."""
    on_emulator: bool = False
    """Whether the adapter is loaded on the emulator (else on a fresh original model)."""


VARIANT_SPECS: tuple[Variant, ...] = (
    Variant("zero_shot", "calibrate"),
    Variant("emulator", "build", on_emulator=True),
    Variant("emulator_lora", "train_emulator", "emulator", on_emulator=True),
    Variant("transfer_uncorrected", "train_emulator", "emulator"),
    Variant("transfer_corrected", "correct", "corrected"),
    Variant("full_lora", "train_original", "original"),
)
VARIANT = {variant.name: variant for variant in VARIANT_SPECS}
VARIANT_NAMES = [variant.name for variant in VARIANT_SPECS]


def evaluated(names: list[str], corrects: bool) -> list[str]:
    """``names`` less the variants that need the correction when the emulator has none (structured baselines)."""
    return [name for name in names if corrects or VARIANT[name].stage != "correct"]
