"""One small interface for every emulator: the SVD emulator (EMLoC, plain) and the structured baselines.

An emulator kind (:func:`emulator_kind`) builds from the calibration statistics, saves to and loads from
the run directory's ``emulator/`` folder, turns a fresh original model into the emulator, counts its
parameters, and says whether LoRA correction applies and which adapter carries the emulator-trained
LoRA to the original model. The stages call these methods instead of branching on the method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Protocol

import pandas as pd
import torch
from torch import nn

from emloc import baselines, io
from emloc.calibration import CalibrationStats
from emloc.config import EmulatorConfig
from emloc.svd_emulator import EmulatorFactors, build_factors, emulate
from emloc.errors import EmlocError


class Emulator(Protocol):
    method: str
    corrects: ClassVar[bool]
    """Whether LoRA correction applies (there is a dense ``W'`` to correct against)."""
    transfer_adapter: ClassVar[str]
    """The adapter (``emloc.rundir.ADAPTERS`` key) that carries the emulator-trained LoRA to the original
    model."""

    @classmethod
    def build(cls, model: nn.Module, stats: CalibrationStats, config: EmulatorConfig,
              progress: bool = True): ...

    @classmethod
    def load(cls, folder: Path, method: str): ...

    def save(self, folder: Path) -> None: ...

    def apply(self, model: nn.Module) -> nn.Module: ...

    def parameters(self, params_original: int, fresh_model: Callable[[], nn.Module]) -> int: ...


def factor_tensors(u: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The flat ``{"<module>.u": u, "<module>.v": v}`` layout of ``emulator/factors.safetensors``."""
    return {f"{n}.{k}": t for n in u for k, t in (("u", u[n]), ("v", v[n]))}


def write_factor_folder(folder: Path, write_factors: Callable[[Path], None], spectra: dict,
                        report: pd.DataFrame) -> None:
    """An SVD emulator's folder: ``write_factors(path)`` writes ``factors.safetensors``, then spectra and
    report."""
    write_factors(folder / "factors.safetensors")
    io.write_tensors(folder / "spectra.safetensors",
                     {f"{n}.{k}": t for n, d in spectra.items() for k, t in d.items()})
    report.to_csv(folder / "report.csv", index=False)


class SvdEmulator(EmulatorFactors):
    """:class:`~emloc.svd_emulator.EmulatorFactors` (``u``, ``v`` per module, spectra, report) as an
    :class:`Emulator`."""

    corrects: ClassVar[bool] = True
    transfer_adapter: ClassVar[str] = "emulator"

    @classmethod
    def of(cls, factors: EmulatorFactors) -> "SvdEmulator":
        if isinstance(factors, cls):
            return factors
        return cls(factors.u, factors.v, factors.spectra, factors.report, factors.method)

    @classmethod
    def build(cls, model, stats, config, progress=True) -> "SvdEmulator":
        return cls.of(build_factors(model, stats, config, progress=progress))

    @classmethod
    def load(cls, folder: Path, method: str) -> "SvdEmulator":
        tensors = io.read_tensors(folder / "factors.safetensors")
        spectra_flat = io.read_tensors(folder / "spectra.safetensors")
        report = io.read_csv(folder / "report.csv")
        names = list(report["module"])
        if sorted(f"{n}.{k}" for n in names for k in "uv") != sorted(tensors) or report.isna().any().any():
            raise EmlocError(f"{folder / 'report.csv'} is corrupted or truncated (it does not list the "
                             f"factored modules): re-run `emloc build --out {folder.parent}`")
        spectra = {n: {"whitened": spectra_flat[f"{n}.whitened"], "plain": spectra_flat[f"{n}.plain"]}
                   for n in names}
        return cls({n: tensors[f"{n}.u"] for n in names}, {n: tensors[f"{n}.v"] for n in names},
                   spectra, report, method)

    def save(self, folder: Path) -> None:
        write_factor_folder(folder, lambda path: io.write_tensors(path, factor_tensors(self.u, self.v)),
                            self.spectra, self.report)

    def apply(self, model: nn.Module) -> nn.Module:
        return emulate(model, self, copy_model=False)

    def parameters(self, params_original: int, fresh_model=None) -> int:
        return params_original - int((self.report["params_before"] - self.report["params_after"]).sum())


def emulator_kind(method: str) -> type:
    """The :class:`Emulator` class that builds, saves, loads and applies emulators of ``method``."""
    return baselines.StructuredEmulator if baselines.is_structured(method) else SvdEmulator


def as_emulator(emulator) -> Emulator:
    """Plain :class:`~emloc.svd_emulator.EmulatorFactors` (e.g. from ``build_factors``) as an
    :class:`Emulator`."""
    return emulator if hasattr(emulator, "apply") else SvdEmulator.of(emulator)
