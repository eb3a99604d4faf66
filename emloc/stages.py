"""The registry of stages and evaluated variants: the one place that lists them, as data.

It names each stage, what it needs, what it writes and which config sections its fingerprint covers, and
imports no stage function: :mod:`emloc.pipeline` maps the names to functions and owns the one loop over
them (:func:`emloc.pipeline.run_stages`); fingerprints (:func:`emloc.rundir.fingerprint`) read each
stage's config sections from here. A new stage is one :class:`Stage` entry (and its function in
:data:`emloc.pipeline.STAGE_FUNCTIONS`); a new evaluated variant is one :class:`Variant` entry in
:data:`VARIANT_SPECS` (views take its label from here and give it a colour).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from emloc.errors import EmlocError

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
    uses_calibration: bool = True
    """Whether ``data.n_calibration`` is part of its fingerprint (LoRA on the original never sees that
    subset)."""
    adapter: Optional[str] = None
    """The adapter folder (``emloc.rundir.ADAPTERS`` key) whose provenance must match for the stage to count
    as done."""
    linkable: bool = True
    """Whether a sweep may hard-link it from another run with the same fingerprint."""

    @property
    def cli_command(self) -> str:
        """The subcommand alone (``train`` for ``train --on original``)."""
        return self.command.split()[0]


STAGES: tuple[Stage, ...] = (
    Stage("calibrate", (), ("calibration",), (), "calibrate", "stage 1a: calibration statistics"),
    Stage("build", ("calibrate",), ("emulator",), ("emulator",), "build", "stage 1b: the emulator"),
    Stage("fidelity", ("calibrate", "build"), ("fidelity.json",), ("emulator", "evaluation"), "fidelity",
          "the emulator's end-to-end fidelity: next-token KL and residual-stream drift per layer"),
    Stage("train_emulator", ("calibrate", "build"),
          ("adapters/emulator_lora", "adapters/recovered_lora", "training/emulator_lora.json"),
          ("emulator", "lora"), "train", "stage 2: LoRA on the emulator (or the original model)",
          adapter="emulator"),
    Stage("train_original", (), ("adapters/full_lora", "training/full_lora.json"), ("lora",),
          "train --on original", "stage 2: LoRA on the emulator (or the original model)",
          uses_calibration=False, adapter="original"),
    Stage("correct", ("calibrate", "build", "train_emulator"), ("adapters/corrected", "correction"),
          ("emulator", "lora", "correction"), "correct", "stage 3: LoRA correction", adapter="corrected"),
    Stage("evaluate", ("calibrate", "build", "train_emulator", "train_original", "correct"),
          ("results.json",), None, "evaluate", "evaluate the six variants", linkable=False),
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
    label: str
    """How tables and figures name it."""
    stage: str
    """The stage whose fingerprint fixes its result (with the evaluation settings); it is evaluated by default
    once that stage is finished."""
    adapter: Optional[str] = None
    """The adapter (``emloc.rundir.ADAPTERS`` key) it checks and loads; ``None``: the plain original model."""
    on_emulator: bool = False
    """Whether the adapter is loaded on the emulator (else on a fresh original model)."""
    gap: bool = False
    """Whether it is measured by the share of the zero-shot -> LoRA-on-the-original gap it closes."""


VARIANT_SPECS: tuple[Variant, ...] = (
    Variant("zero_shot", "zero-shot original", "calibrate"),
    Variant("emulator", "emulator (no LoRA)", "build", on_emulator=True),
    Variant("emulator_lora", "emulator + LoRA", "train_emulator", "emulator", on_emulator=True, gap=True),
    Variant("transfer_uncorrected", "original + LoRA (no correction)", "train_emulator", "emulator",
            gap=True),
    Variant("transfer_corrected", "original + corrected LoRA", "correct", "corrected", gap=True),
    Variant("full_lora", "LoRA on the original", "train_original", "original"),
)
VARIANT = {variant.name: variant for variant in VARIANT_SPECS}
VARIANT_NAMES = [variant.name for variant in VARIANT_SPECS]


def evaluated(names: list[str], corrects: bool) -> list[str]:
    """``names`` less the variants that need the correction when the emulator has none (structured
    baselines)."""
    return [name for name in names if corrects or VARIANT[name].stage != "correct"]
