"""How LoRA training computes (``lora.precision``, Lightning's spelling), and whether the hardware runs
bfloat16 natively.

``32-true``: float32 throughout (the default; bitwise today's training). ``bf16-mixed``: the forward and
backward of training run under bfloat16 autocast (``transformers.TrainingArguments(bf16=True)``, which
accelerate turns into ``torch.autocast``); the LoRA weights, their gradients and the optimizer state stay
float32, and the frozen weights stay in ``dtype`` (autocast casts them per matmul). ``auto``: ``bf16-mixed``
where the device runs bfloat16 natively (CPU: AMX-BF16 or AVX512-BF16, or Arm BF16; CUDA:
``torch.cuda.is_bf16_supported()``), else ``32-true``. Decompositions, calibration statistics, the
correction and evaluation never read it. See docs/precision.md.

Also: how many threads training uses when other work shares the CPU (:func:`threads_for_training`).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from emloc.config import PRECISIONS
from emloc.errors import EmlocError

DEFAULT_PRECISION = PRECISIONS[0]
"""``32-true``: the precision every run had before ``lora.precision`` existed."""
CPU_BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16",
                     "sve_bf16": "SVE-BF16"}
"""``torch.cpu.get_capabilities()`` keys that mean bfloat16 matmuls run natively, with their names."""
SLOW_BF16 = "under 1 GFLOPS was measured on an AVX2-only CPU"


@dataclass(frozen=True)
class PrecisionChoice:
    """The concrete precision training uses for a requested one on a device, and why."""

    requested: str
    precision: str
    """``32-true`` or ``bf16-mixed`` (never ``auto``)."""
    native: bool | None
    """Whether the device runs bfloat16 natively (``None``: not asked, for ``32-true``)."""
    hardware: str
    """The reason in words, e.g. 'the CPU has AMX-BF16, AVX512-BF16'."""

    def line(self) -> str | None:
        """The one line to print: what ``auto`` chose and why, or a warning for an explicit ``bf16-mixed``
        without native bfloat16; ``None`` otherwise."""
        if self.requested == "auto":
            return f"lora.precision auto -> {self.precision}: {self.hardware}"
        if self.precision == "bf16-mixed" and not self.native:
            return (f"emloc: warning: lora.precision bf16-mixed, but {self.hardware}: bfloat16 is emulated "
                    f"and training will be very slow ({SLOW_BF16}); use 32-true or auto")
        return None


def cpu_bf16_features() -> list[str]:
    """The CPU's native bfloat16 features as torch reports them (empty: none, or torch cannot tell)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:  # torch >= 2.9
        capabilities = get_capabilities()
        return [name for key, name in CPU_BF16_FEATURES.items() if capabilities.get(key) is True]
    probes = {"AMX-BF16": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}  # older torch
    return [name for name, probe in probes.items() if getattr(torch._C._cpu, probe, lambda: False)()]


def _device_type(device: str | torch.device) -> str:
    """'cpu' or 'cuda' (or another torch device type); ``auto`` is cuda when available. Never raises: a device
    this machine lacks is for training to refuse."""
    if isinstance(device, torch.device):
        return device.type
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device).split(":")[0]


def native_bf16(device: str | torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bfloat16 natively, and the reason in words."""
    kind = _device_type(device)
    if kind == "cpu":
        features = cpu_bf16_features()
        if features:
            return True, f"the CPU has {', '.join(features)}"
        return False, (f"the CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 "
                       f"(no AMX-BF16 or AVX512-BF16)")
    if kind == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return supported, f"the GPU {'supports' if supported else 'lacks'} bfloat16"
    return False, f"no bfloat16 check for device type {kind!r}"


def choose_precision(requested: str, device: str | torch.device) -> PrecisionChoice:
    """The concrete precision for ``requested`` on ``device`` (``auto`` resolved; the others kept)."""
    if requested not in PRECISIONS:
        raise EmlocError(f"lora.precision = {requested!r} is unknown: use {', '.join(PRECISIONS)}")
    if requested == DEFAULT_PRECISION:  # no probe: today's path stays untouched
        return PrecisionChoice(requested, requested, None, "float32 throughout")
    native, hardware = native_bf16(device)
    precision = ("bf16-mixed" if native else DEFAULT_PRECISION) if requested == "auto" else requested
    return PrecisionChoice(requested, precision, native, hardware)


def announce(choice: PrecisionChoice) -> None:
    """Print the choice's one line, if it has one (warnings go to stderr)."""
    line = choice.line()
    if line:
        print(line, file=sys.stderr if line.startswith("emloc: warning") else sys.stdout, flush=True)


def trainer_arguments(choice: PrecisionChoice, device: torch.device) -> dict:
    """``TrainingArguments`` for the chosen precision: nothing for ``32-true``, ``bf16=True`` for
    ``bf16-mixed`` (accelerate's CPU or CUDA autocast)."""
    if choice.precision == DEFAULT_PRECISION:
        return {}
    if device.type == "cuda" and not choice.native:
        raise EmlocError("lora.precision bf16-mixed needs a GPU with bfloat16 (Ampere or newer): "
                         "use 32-true or auto")
    return {"bf16": True}


def fingerprint_part(lora: dict, device: str) -> dict:
    """The ``lora`` config section as fingerprints hash it: ``precision`` resolved (``auto`` -> what this
    machine would train with) and left out when it is ``32-true``, so runs made before the option existed
    keep their fingerprints."""
    requested = lora.get("precision", DEFAULT_PRECISION)
    resolved = requested if requested != "auto" else choose_precision(requested, device).precision
    rest = {key: value for key, value in lora.items() if key != "precision"}
    return rest if resolved == DEFAULT_PRECISION else rest | {"precision": resolved}


# ---- threads beside other work ------------------------------------------------------------------

def busy_cpus(window_s: float = 0.25) -> float | None:
    """How many CPUs other work keeps busy, from ``/proc/stat`` over ``window_s`` seconds while this process
    waits (None where there is no ``/proc/stat``)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values[:8]), values[3] + values[4]  # total jiffies (no guest time), idle + iowait
    try:
        total_before, idle_before = sample()
        time.sleep(window_s)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total_after - total_before
    return None if total <= 0 else (1 - (idle_after - idle_before) / total) * (os.cpu_count() or 1)


def threads_beside(busy: float | None, threads: int, cpus: int) -> int:
    """Training threads that leave ``busy`` CPUs (of ``cpus``) to other work: at most ``threads``, at least
    one. Two processes whose OpenMP threads outnumber the cores wait on each other at every parallel region
    (measured: a step of many seconds instead of two); one thread on the free core keeps the step within 2x
    of idle."""
    if busy is None:
        return threads
    return max(1, min(threads, int(cpus - busy + 0.5)))


@contextmanager
def threads_for_training():
    """Lower torch's thread count for the duration of training when other work holds CPUs (never when
    ``OMP_NUM_THREADS`` is set: then the user chose), saying so in one line; restored afterwards."""
    before = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS") or before <= 1:
        yield before
        return
    busy, cpus = busy_cpus(), os.cpu_count() or 1
    chosen = threads_beside(busy, before, cpus)
    if chosen < before:
        print(f"other work keeps {busy:.1f} of {cpus} CPUs busy: training on {chosen} of {before} "
              f"threads (set OMP_NUM_THREADS to choose)", file=sys.stderr, flush=True)
        torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)
