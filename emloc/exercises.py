"""Automatic checks for the notebooks' exercises (issue 14), and the tool that fills in their solutions.

Every ``check_*`` function prints one line, ``✅ correct: ...`` or
``❌ not yet: <what is wrong> - hint: <hint>``, and returns a :class:`CheckResult` (truthy when correct). A
wrong answer never raises: ``None``, wrong types or shapes, NaNs and exceptions inside a student's function
all become a hint. The reference is always computed by the library (:mod:`emloc.lowrank`,
:mod:`emloc.reports`, :mod:`emloc.lora`, :mod:`emloc.correction`) or read from the run's saved artifacts;
nothing here re-implements the math.

Exercise cells follow one convention (``docs/teaching.md``): a code cell whose first line is
``# EXERCISE <id>``; :func:`solve_notebook` replaces the rest of that cell with the solution snippet
``# SOLUTION <id>`` from ``notebooks/solutions/solutions.py``. ``python -m emloc.exercises solve``
writes the solved notebooks that CI runs.
"""
from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from emloc.errors import EmlocError, report_errors
from emloc.families import weight_matrix

EXERCISE_HEADER = re.compile(r"^# EXERCISE (?P<id>[A-Za-z0-9_\-]+)\s*$")
SOLUTION_HEADER = re.compile(r"^# SOLUTION (?P<id>[A-Za-z0-9_\-]+)\s*$", re.MULTILINE)
SOLUTIONS_FILE = Path(__file__).resolve().parents[1] / "notebooks" / "solutions" / "solutions.py"


# ---- verdicts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``passed`` and the one-line ``message`` already printed."""

    exercise: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return self.message

    def _ipython_display_(self) -> None:
        """The line is printed already: show nothing more when a check is a cell's last expression."""


class NotYet(Exception):
    """A wrong answer: ``problem`` says what is wrong, ``hint`` how to fix it (never shown as a traceback)."""

    def __init__(self, problem: str, hint: str):
        super().__init__(problem)
        self.problem, self.hint = problem, hint


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def exercise(exercise_id: str, hint: str) -> Callable:
    """Decorate a check: its body returns the success text or raises :class:`NotYet`; anything else a
    student's input provokes is turned into a ``❌`` line with ``hint`` (the exercise's general hint)."""

    def decorate(check: Callable[..., str]) -> Callable[..., CheckResult]:
        @functools.wraps(check)
        def wrapper(*args, **kwargs) -> CheckResult:
            try:
                message = f"✅ correct: {check(*args, **kwargs)}"
                passed = True
            except NotYet as wrong:
                message, passed = f"❌ not yet: {wrong.problem} - hint: {wrong.hint}", False
            except EmlocError as error:
                message, passed = f"❌ cannot check yet: {error}", False
            except Exception as exc:  # a student's garbage input must never end in a traceback
                message, passed = (f"❌ not yet: your answer could not be checked ({_first_line(exc)}) "
                                   f"- hint: {hint}"), False
            print(message, flush=True)
            return CheckResult(exercise_id, passed, message)

        wrapper.exercise_id = exercise_id
        return wrapper

    return decorate


def _call(function: Any, *args) -> Any:
    """Call a student's function; its exceptions become a :class:`NotYet`."""
    if not callable(function):
        raise NotYet(f"expected a function, got {_describe(function)}",
                     "pass the function itself (its name, no parentheses)")
    try:
        return function(*args)
    except Exception as exc:
        shown = ", ".join(_describe(a) if hasattr(a, "shape") else repr(a) for a in args)
        raise NotYet(f"your function raised {_first_line(exc)} for the input ({shown})",
                     "run it on that input in a cell of its own and read the error") from None


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    shape, kind = getattr(value, "shape", None), type(value).__name__
    return (f"{'an' if kind[0] in 'aeiouE' else 'a'} {kind}"
            + (f" of shape {tuple(shape)}" if shape is not None else ""))


def _number(value: Any, what: str) -> float:
    if value is None or value is Ellipsis:
        raise NotYet(f"{what} is {value!r}",
                     "replace the placeholder with your computation and make sure it is returned")
    if (isinstance(value, torch.Tensor | np.ndarray)
            and (value.numel() if isinstance(value, torch.Tensor) else value.size) == 1):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise NotYet(f"{what} is {_describe(value)}, not a number", "compute a single number (int or float)")
    if not math.isfinite(float(value)):
        raise NotYet(f"{what} is {value}", "look for a division by zero or a log/sqrt of a negative number")
    return float(value)


def _integer(value: Any, what: str) -> int:
    number = _number(value, what)
    if number != int(number):
        raise NotYet(f"{what} is {number}, not a whole number",
                     "a rank counts directions: round down with math.floor")
    return int(number)


def _tensor(value: Any, what: str) -> torch.Tensor:
    """A student's matrix as a float64 tensor (torch, numpy or nested lists)."""
    if value is None or value is Ellipsis:
        raise NotYet(f"{what} is {value!r}",
                     "replace the placeholder with your computation and assign the result")
    try:
        tensor = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor)
                                            else value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise NotYet(f"{what} is {_describe(value)}, not a matrix ({_first_line(exc)})",
                     "build it with torch operations (@ for matrix products)") from None
    if not torch.isfinite(tensor).all():
        raise NotYet(f"{what} contains NaN or Inf",
                     "look for a division by a zero singular value or eigenvalue")
    return tensor


def _same_shape(answer: torch.Tensor, reference: torch.Tensor, what: str, hint: str) -> None:
    if tuple(answer.shape) == tuple(reference.shape):
        return
    if tuple(answer.shape) == tuple(reference.shape[::-1]):
        raise NotYet(f"{what} has shape {tuple(answer.shape)}, "
                     f"the transpose of the expected {tuple(reference.shape)}",
                     "check the order of your matrix product (or drop a .T)")
    raise NotYet(f"{what} has shape {tuple(answer.shape)}, expected {tuple(reference.shape)}", hint)


def relative_difference(answer: torch.Tensor, reference: torch.Tensor) -> float:
    """``||answer - reference||_F / ||reference||_F`` (float64)."""
    answer, reference = answer.double(), reference.double()
    return float((answer - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _close(answer: torch.Tensor, reference: torch.Tensor, rtol: float) -> bool:
    return relative_difference(answer, reference) <= rtol


# ---- run access (all reads of saved artifacts; no model unless the exercise is about weights) ----------

def _factors(source: Any):
    """Spectra and report from an ``EmulatorFactors``, a :class:`~emloc.pipeline.Run` or an unpacked run
    folder."""
    if hasattr(source, "spectra") and hasattr(source, "report"):
        return source
    from emloc.bundle import light_factors
    folder = getattr(source, "dir", source)
    if not isinstance(folder, str | Path):
        raise EmlocError(f"expected the run or its factors (run.factors()), got {_describe(source)}")
    return light_factors(folder)


def _module_row(factors, name: Any):
    report = factors.report
    if not isinstance(name, str) or name not in set(report["module"]):
        example = report["module"].iloc[0]
        raise NotYet(f"{name!r} is not a compressed module of this run",
                     f"use a full module name such as {example!r} (see factors.report['module'])")
    return report[report["module"] == name].iloc[0]


def _weight(run, name: str) -> torch.Tensor:
    try:
        return weight_matrix(run.model.get_submodule(name)).double()
    except AttributeError:
        raise NotYet(f"{name!r} is not a linear layer of the model",
                     "use a name from factors.report['module']") from None


def calibration_C(run, name: str) -> torch.Tensor:
    """Module ``name``'s ``C`` (float64) (``in x in``) read from ``calibration/stats.safetensors`` without
    loading the others."""
    from safetensors import safe_open

    from emloc import io
    folder = Path(run.dir) / "calibration"
    input_of = io.read_json(folder / "stats.json")["input_of"]
    if not (folder / "stats.safetensors").exists():
        raise EmlocError(f"{folder / 'stats.safetensors'} is missing (a class bundle leaves it out): "
                         f"unpack a bundle made with --with-stats or run `emloc calibrate --out {run.dir}`")
    with safe_open(str(folder / "stats.safetensors"), framework="pt") as handle:
        return handle.get_tensor(input_of[name]).double()


# ---- notebook 01: ranks and spectra ----------------------------------------------------------

RANK_CASES = [(0.5, 576, 576), (0.5, 1536, 576), (0.3, 192, 576), (0.25, 100, 7), (0.9, 49, 1000),
              (0.001, 64, 64)]


@exercise("rank_from_ratio", "r = floor(rho * out * in / (out + in)), and at least 1")
def check_rank_from_ratio(answer_fn) -> str:
    """``answer_fn(rho, out_features, in_features) -> int`` must follow
    :func:`emloc.lowrank.rank_from_ratio`."""
    from emloc.lowrank import break_even_rank, rank_from_ratio
    for rho, out_f, in_f in RANK_CASES:
        answer = _integer(_call(answer_fn, rho, out_f, in_f), f"your rank for rho={rho}, W: {out_f} x {in_f}")
        expected = rank_from_ratio(rho, out_f, in_f)
        if answer == expected:
            continue
        exact = rho * break_even_rank(out_f, in_f)
        if answer == 0:
            hint = "keep at least one direction: max(1, ...)"
        elif answer == round(exact) or answer == math.ceil(exact):
            hint = "round down (math.floor): rounding up can cross the parameter budget"
        elif answer == math.floor(rho * min(out_f, in_f)):
            hint = "the rule scales the break-even rank out*in/(out+in), not min(out, in)"
        else:
            hint = "r = floor(rho * out * in / (out + in)), and at least 1"
        raise NotYet(f"for rho={rho}, W: {out_f} x {in_f} you give r={answer}, expected {expected}", hint)
    return (f"your rule matches rank_from_ratio on {len(RANK_CASES)} shapes "
            f"(including a tiny rho that needs max(1, ...))")


@exercise("break_even", "u v holds r*(out+in) numbers, W holds out*in: solve r*(out+in) = out*in")
def check_break_even(value, out_features: int, in_features: int) -> str:
    """``value``: the rank at which ``u v`` (``out x r`` and ``r x in``) holds as many parameters as ``W``."""
    from emloc.lowrank import break_even_rank
    answer, expected = _number(value, "your break-even rank"), break_even_rank(out_features, in_features)
    if (math.isclose(answer, expected, rel_tol=1e-6)
            or (answer == int(answer) and int(answer) == math.floor(expected))):
        return (f"break-even rank {expected:.2f} for W: {out_features} x {in_features}: "
                f"u v is smaller than W only below it")
    if math.isclose(answer, min(out_features, in_features)):
        hint = "min(out, in) is the largest possible rank, not where u v starts to pay"
    elif (math.isclose(answer, out_features * in_features / 2)
          or math.isclose(answer, (out_features + in_features) / 2)):
        hint = "count both factors: u has out*r numbers, v has r*in"
    else:
        hint = "u v holds r*(out+in) numbers, W holds out*in: solve r*(out+in) = out*in"
    raise NotYet(f"{answer:g} is not the break-even rank of a {out_features} x {in_features} W", hint)


ERROR_CURVE_SIGMA = torch.linspace(3.0, 0.1, 24, dtype=torch.float64) ** 2


@exercise("error_curve", "error(k) = sqrt(sum of sigma_i^2 for i >= k / sum of all sigma_i^2)")
def check_error_curve(error_fn, sigma=None) -> str:
    """``error_fn(sigma, k) -> float``: the relative error of keeping the top ``k`` of the descending
    ``sigma`` (:func:`emloc.lowrank.relative_error_curve`). ``sigma`` defaults to a made-up spectrum."""
    from emloc.lowrank import relative_error_curve
    sigma = ERROR_CURVE_SIGMA if sigma is None else torch.as_tensor(sigma).double()
    reference = relative_error_curve(sigma)
    n = len(sigma)
    for k in sorted({0, 1, n // 4, n // 2, n - 1, n}):
        answer = _number(_call(error_fn, sigma.clone(), k), f"your error for k={k}")
        expected = float(reference[k])
        if math.isclose(answer, expected, rel_tol=1e-6, abs_tol=1e-9):
            continue
        if math.isclose(answer, float(sigma[k:].sum() / sigma.sum()), rel_tol=1e-6, abs_tol=1e-9):
            hint = "use the energies sigma_i^2, and take the square root at the end"
        elif math.isclose(answer, expected ** 2, rel_tol=1e-6, abs_tol=1e-9):
            hint = "that is the squared error: take the square root"
        elif k < n and math.isclose(answer, float(reference[k + 1]), rel_tol=1e-6, abs_tol=1e-9):
            hint = "keeping k values drops sigma_k, sigma_k+1, ... (0-based): sum from index k, not k+1"
        elif k > 0 and math.isclose(answer, float(reference[k - 1]), rel_tol=1e-6, abs_tol=1e-9):
            hint = "keeping k values drops sigma[k:] (0-based), not sigma[k-1:]"
        elif math.isclose(answer, 1 - expected ** 2, rel_tol=1e-6, abs_tol=1e-9):
            hint = "that is the kept energy: the error is about what you drop"
        else:
            hint = "error(k) = sqrt(sum of sigma_i^2 for i >= k / sum of all sigma_i^2)"
        raise NotYet(f"for k={k} you give {answer:.6g}, expected {expected:.6g}", hint)
    return f"your error curve matches relative_error_curve for k = 0 .. {n} on a {n}-value spectrum"


@exercise("smallest_rank",
          "read the module's error curve and take the first k whose error is at most the target")
def check_smallest_rank(r, factors, module: str, target: float, kind: str = "whitened") -> str:
    """``r``: the smallest rank whose relative error (``kind`` spectrum of ``module``) is at most
    ``target``."""
    from emloc.reports import spectrum_curves
    factors = _factors(factors)
    _module_row(factors, module)
    error = spectrum_curves(factors.spectra[module][kind])["error"]
    expected = int(np.argmax(error <= target + 1e-12))
    answer = _integer(r, "your rank")
    if answer == expected:
        return (f"rank {expected} is the smallest with {kind} error {error[expected]:.4f} <= {target:.4g} "
                f"for {module}")
    if not 0 <= answer < len(error):
        raise NotYet(f"rank {answer} is outside 0..{len(error) - 1} for {module}",
                     "a rank is between 0 and min(out, in)")
    if error[answer] > target + 1e-12:
        raise NotYet(f"at rank {answer} the {kind} error is {error[answer]:.4f}, above {target:.4g}",
                     "you need more directions: look where the error curve crosses the target")
    raise NotYet(f"rank {answer} reaches the target, but a smaller rank does too",
                 "take the *first* k whose error is at most the target (np.argmax(error <= target))")


# ---- notebook 02: the emulator ---------------------------------------------------------------

@exercise("whitened_truncation",
          "C = S S^T; SVD of W S; keep the top r left singular vectors U_r; W' = U_r U_r^T W")
def check_whitened_truncation(W_prime, run, name: str, r: int) -> str:
    """``W_prime`` (``out x in``): the activation-aware rank-``r`` approximation of module ``name``'s weight,
    compared with :func:`emloc.lowrank.whitened_truncation` on the run's calibration statistics."""
    from emloc.lowrank import calibration_error, plain_truncation, whitened_truncation
    W = _weight(run, name)
    C = calibration_C(run, name)
    answer = _tensor(W_prime, "W'")
    u, v, _ = whitened_truncation(W, C, int(r))
    reference = u @ v
    _same_shape(answer, reference, "W'", f"W' replaces W, so it has W's shape {tuple(W.shape)}")
    expected_error, error = calibration_error(W, reference, C), calibration_error(W, answer, C)
    # ties among singular values make W' not unique: an equal calibration error is as good
    if _close(answer, reference, 1e-4) or (torch.linalg.matrix_rank(answer) <= r and
                                           math.isclose(error, expected_error, rel_tol=1e-4, abs_tol=1e-8)):
        return (f"your W' has calibration error {error:.4f}, "
                f"the best any rank-{r} matrix can do on these inputs")
    rank = int(torch.linalg.matrix_rank(answer))
    if rank > r:
        raise NotYet(f"your W' has rank {rank}, more than r = {r}", "keep only the top r singular directions")
    u_plain, v_plain, _ = plain_truncation(W, int(r))
    if math.isclose(error, calibration_error(W, u_plain @ v_plain, C), rel_tol=1e-4):
        raise NotYet(f"your W' is the plain SVD truncation of W "
                     f"(calibration error {error:.4f} > {expected_error:.4f})",
                     "whiten first: factor C = S S^T and take the SVD of W S, not of W")
    raise NotYet(f"your W' has calibration error {error:.4f}, the activation-aware one {expected_error:.4f}",
                 "C = S S^T; SVD of W S; keep the top r left singular vectors U_r; W' = U_r U_r^T W")


@exercise("compressed_parameters", "u is out x r and v is r x in, with r from the ratio rule")
def check_compressed_parameters(value, out_features: int, in_features: int, rho: float) -> str:
    """``value``: the parameters of the low-rank ``u v`` that replaces an ``out x in`` weight at ratio
    ``rho``."""
    from emloc.lowrank import rank_from_ratio
    r = rank_from_ratio(rho, out_features, in_features)
    expected, answer = r * (out_features + in_features), _integer(value, "your parameter count")
    if answer == expected:
        return (f"rank {r}: u v holds {expected:,} parameters instead of {out_features * in_features:,} "
                f"({expected / (out_features * in_features):.0%} of W)")
    if answer == out_features * in_features:
        hint = "that is W's own count: the emulator stores u (out x r) and v (r x in) instead"
    elif answer == round(rho * out_features * in_features):
        hint = "rho fixes the rank (r = floor(rho out in / (out + in))); count u and v at that whole rank"
    else:
        hint = "u is out x r and v is r x in, with r from the ratio rule"
    raise NotYet(f"{answer:,} parameters, expected {expected:,}", hint)


@exercise("prediction", "compare the mean error per module type at that ratio "
                        "(error map, or errors_at_ratio grouped by type)")
def check_prediction(module_type: str, factors, rho: float) -> str:
    """``module_type`` (e.g. ``'down_proj'``): the module type with the largest mean activation-aware error at
    ratio ``rho``, from :func:`emloc.reports.errors_at_ratio` on the cached spectra."""
    from emloc.reports import error_curves, errors_at_ratio
    factors = _factors(factors)
    table = errors_at_ratio(factors.report, error_curves(factors.spectra, "whitened"), float(rho))
    per_type = table.groupby("type", sort=False)["error"].mean().sort_values(ascending=False)
    expected = per_type.index[0]
    if not isinstance(module_type, str) or module_type not in per_type.index:
        raise NotYet(f"{module_type!r} is not a module type of this emulator",
                     f"answer with one of {', '.join(map(repr, per_type.index))}")
    if module_type == expected:
        runner_up = per_type.index[1] if len(per_type) > 1 else None
        tail = f", then {runner_up} ({per_type.iloc[1]:.3f})" if runner_up else ""
        return f"at rho = {rho:g} {expected} loses most (mean error {per_type.iloc[0]:.3f}){tail}"
    raise NotYet(f"at rho = {rho:g} {module_type} has mean error {per_type[module_type]:.3f}, "
                 f"but another type loses more", "compare the mean error per module type at that ratio "
                 "(move the error map's slider, or group errors_at_ratio(...) by 'type')")


# ---- notebook 03: LoRA -----------------------------------------------------------------------

@exercise("lora_scaling", "peft scales B A by s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))")
def check_lora_scaling(value, alpha: float, r: int, use_rslora: bool = False) -> str:
    """``value``: peft's scaling ``s`` of ``B A`` (:func:`emloc.lora.lora_scaling`)."""
    from emloc.lora import lora_scaling
    answer, expected = _number(value, "your scaling s"), lora_scaling(alpha, r, use_rslora)
    if math.isclose(answer, expected, rel_tol=1e-6):
        return f"s = {expected:g}: the update is {expected:g} * B A"
    if math.isclose(answer, r / alpha, rel_tol=1e-6):
        hint = "upside down: s = lora_alpha / r"
    elif math.isclose(answer, lora_scaling(alpha, r, not use_rslora), rel_tol=1e-6):
        hint = "rsLoRA divides by sqrt(r), plain LoRA by r: check use_rslora"
    else:
        hint = "peft scales B A by s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))"
    raise NotYet(f"s = {answer:g}, expected {expected:g} for alpha={alpha:g}, r={r}", hint)


@exercise("lora_parameters",
          "each adapted linear adds A (r x in) and B (out x r): r * (in + out) per module, summed")
def check_lora_parameters(value, run, which: str = "emulator") -> str:
    """``value``: the trainable LoRA parameters of the run's adapter (the training summary's count)."""
    expected = int(run.history(which)["trainable_parameters"])
    answer = _integer(value, "your parameter count")
    if answer == expected:
        return (f"{expected:,} trainable LoRA parameters "
                f"({run.config.lora.r} x (in + out) over every adapted linear)")
    if expected % max(answer, 1) == 0 and answer and expected // answer in (2, run.config.lora.r):
        hint = "count both A and B, and multiply by the LoRA rank r"
    else:
        hint = "each adapted linear adds A (r x in) and B (out x r): r * (in + out) per module, summed"
    raise NotYet(f"{answer:,} trainable parameters, the adapter has {expected:,}", hint)


# ---- notebook 04: the correction -------------------------------------------------------------

@exercise("B_tilde_and_D", "Q = orthonormal basis of A's rows (SVD of A^T, as the official code); "
                           "B~ = B A Q; D = (W - W') Q / s")
def check_B_tilde_and_D(B_tilde, D, run, name: str, Q=None) -> str:
    """``B_tilde = B A Q`` and ``D = (W - W') Q / s`` (both ``out x r``) for module ``name``, compared with
    the run's saved correction tensors. A ``Q`` other than the library's (e.g. from an SVD) is fine: pass it
    as ``Q`` and the basis-free products ``B~ Q^T`` and ``D Q^T`` are compared."""
    tensors = run.correction_tensors()
    if not isinstance(name, str) or f"{name}.D" not in tensors:
        example = next(iter(tensors)).rsplit(".", 1)[0]
        raise NotYet(f"{name!r} is not a corrected module of this run",
                     f"use a full module name such as {example!r}")
    ref = {key: tensors[f"{name}.{key}"].double() for key in ("Q", "B_tilde", "D")}
    B_tilde, D = _tensor(B_tilde, "B~"), _tensor(D, "D")
    shape_hint = f"both are out x r: {tuple(ref['D'].shape)}"
    _same_shape(B_tilde, ref["B_tilde"], "B~", shape_hint)
    _same_shape(D, ref["D"], "D", shape_hint)
    Q = ref["Q"] if Q is None else _tensor(Q, "Q")
    _same_shape(Q, ref["Q"], "Q", f"Q is in x r: {tuple(ref['Q'].shape)}")
    B_full, D_full = B_tilde @ Q.T, D @ Q.T
    B_ref, D_ref = ref["B_tilde"] @ ref["Q"].T, ref["D"] @ ref["Q"].T
    rtol = 1e-3  # the saved tensors are float32
    if not _close(B_full, B_ref, rtol):
        raise NotYet(f"B~ is off by {relative_difference(B_full, B_ref):.1%} (relative)",
                     "B~ = B A Q (out x r): B A written in the basis Q; "
                     "if you built your own Q, pass it as Q=...")
    if _close(D_full, D_ref, rtol):
        return f"B~ and D of {name} match the saved correction ({tuple(D.shape)[0]} x {tuple(D.shape)[1]})"
    if _close(-D_full, D_ref, rtol):
        raise NotYet("D has the wrong sign", "D = (W - W') Q / s: the original minus the emulator")
    ratio = float((D_full * D_ref).sum() / D_ref.pow(2).sum().clamp_min(1e-300))
    if abs(ratio - 1) > 1e-3 and _close(D_full / ratio, D_ref, rtol):
        raise NotYet(f"D is {ratio:.4g} times the expected one",
                     "divide by peft's scaling s = lora_alpha / r")
    raise NotYet(f"D is off by {relative_difference(D_full, D_ref):.1%} (relative)",
                 "D = (W - W') Q / s with W' = u v from the emulator's factors and s = lora_alpha / r")


@exercise("clamp", "per column j: ratio_j = mean|D_j| / mean|B~_j|; "
                   "where ratio_j > lambda, scale D_j by lambda / ratio_j")
def check_clamp(D_clamped, D, B_tilde, lam: float) -> str:
    """``D_clamped``: ``D`` after the per-column clamp at ``lam`` (:func:`emloc.correction.clamp_columns`)."""
    from emloc.correction import clamp_columns
    D, B_tilde = _tensor(D, "D"), _tensor(B_tilde, "B~")
    answer = _tensor(D_clamped, "your clamped D")
    expected, clamped = clamp_columns(D, B_tilde, float(lam))
    _same_shape(answer, expected, "your clamped D", "the clamp only rescales columns: D's shape stays")
    if _close(answer, expected, 1e-6):
        return f"the clamp scaled {int(clamped.sum())} of {clamped.numel()} columns at lambda = {lam:g}"
    changed = (answer - D).abs().amax(0) > 1e-12 * D.abs().max()
    if bool((changed & ~clamped).any()):
        hint = "only the columns whose ratio exceeds lambda change; the others stay as they are"
    elif bool((~changed & clamped).any()):
        hint = ("some columns with ratio above lambda were left unscaled: "
                "compare per column (mean over rows, axis 0)")
    else:
        hint = "scale a clamped column by lambda / ratio_j, so its new ratio is exactly lambda"
    raise NotYet(f"your clamped D differs from the expected one by "
                 f"{relative_difference(answer, expected):.1%}", hint)


@exercise("subject_share", "take the stored samples of the subject digit, turn them into the judge's "
                           "input range [-1, 1] with a channel axis, and count those it reads as that digit")
def check_subject_share(share, results: dict, variant: str = "transfer_corrected") -> str:
    """``share``: of ``variant``'s stored samples of the held-out digit, the share the judge reads as it."""
    from emloc.denoiser import HELD_OUT_DIGIT, judged, stored_samples
    images = stored_samples(results["samples"][variant])[HELD_OUT_DIGIT]
    seen = judged(torch.tensor(images * 2 - 1, dtype=torch.float32).unsqueeze(1))
    expected = float((seen == HELD_OUT_DIGIT).mean())
    answer = _number(share, "your share")
    if abs(answer - expected) < 1e-9:
        return (f"the judge reads {expected:.0%} of the {len(images)} stored samples of {variant} as a "
                f"{HELD_OUT_DIGIT}")
    if abs(answer - (1 - expected)) < 1e-9:
        raise NotYet(f"{answer:.3f} is the share judged something else",
                     "count the samples judged the subject")
    raise NotYet(f"{answer:.3f} is not the share of subject samples judged {HELD_OUT_DIGIT}",
                 "use stored_samples(...)[HELD_OUT_DIGIT], map [0, 1] to [-1, 1] and add a channel axis")


CHECKS = {f.exercise_id: f for f in (check_rank_from_ratio, check_break_even, check_error_curve,
                                     check_smallest_rank,
                                     check_whitened_truncation, check_compressed_parameters, check_prediction,
                                     check_lora_scaling, check_lora_parameters, check_B_tilde_and_D,
                                     check_clamp, check_subject_share)}


# ---- solutions -------------------------------------------------------------------------------

def read_solutions(path: str | Path = SOLUTIONS_FILE) -> dict[str, str]:
    """``{exercise_id: code}`` from a file of ``# SOLUTION <id>`` blocks (each block runs to the next
    header)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmlocError(f"solutions file {path} does not exist: pass --solutions FILE") from None
    headers = list(SOLUTION_HEADER.finditer(text))
    if not headers:
        raise EmlocError(f"{path} has no '# SOLUTION <id>' line: each solution starts with one")
    solutions: dict[str, str] = {}
    for header, following in zip(headers, [*headers[1:], None]):
        exercise_id = header.group("id")
        if exercise_id in solutions:
            raise EmlocError(f"{path} has two solutions for exercise {exercise_id!r}: keep one")
        solutions[exercise_id] = text[header.end():following.start() if following
                                      else len(text)].strip("\n") + "\n"
    return solutions


def exercise_ids(notebook) -> list[str]:
    """The ids of a notebook's exercise cells, in order (cells whose first line is ``# EXERCISE <id>``)."""
    ids = []
    for cell in notebook.cells:
        match = EXERCISE_HEADER.match(cell.source.split("\n", 1)[0]) if cell.cell_type == "code" else None
        if match:
            ids.append(match.group("id"))
    return ids


def solve_notebook(notebook, solutions: dict[str, str]):
    """A copy of ``notebook`` whose exercise cells hold their solutions (header kept, outputs cleared)."""
    import copy
    solved = copy.deepcopy(notebook)
    for cell in solved.cells:
        match = EXERCISE_HEADER.match(cell.source.split("\n", 1)[0]) if cell.cell_type == "code" else None
        if not match:
            continue
        exercise_id = match.group("id")
        if exercise_id not in solutions:
            raise EmlocError(f"exercise {exercise_id!r} has no solution: "
                             f"add '# SOLUTION {exercise_id}' to the solutions file")
        cell.source = f"# EXERCISE {exercise_id}\n{solutions[exercise_id].rstrip()}"
        cell.outputs, cell.execution_count = [], None
    return solved


def solve_files(notebooks: list[str | Path], out_dir: str | Path,
                solutions_file: str | Path = SOLUTIONS_FILE) -> list[Path]:
    """Write the solved copy of each notebook into ``out_dir`` (same file names); returns their paths."""
    import nbformat
    solutions = read_solutions(solutions_file)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in map(Path, notebooks):
        if not source.is_file():
            raise EmlocError(f"notebook {source} does not exist: check the path")
        target = out_dir / source.name
        nbformat.write(solve_notebook(nbformat.read(source, as_version=4), solutions), target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m emloc.exercises solve NB.ipynb ... --out DIR [--solutions FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m emloc.exercises",
                                     description="fill in the notebooks' exercises")
    sub = parser.add_subparsers(dest="command", required=True)
    solve = sub.add_parser("solve", help="write solved copies of exercise notebooks")
    solve.add_argument("notebooks", nargs="+")
    solve.add_argument("--out", required=True, help="folder for the solved notebooks")
    solve.add_argument("--solutions", default=str(SOLUTIONS_FILE), help="file of '# SOLUTION <id>' blocks")
    args = parser.parse_args(argv)

    def command() -> None:
        for path in solve_files(args.notebooks, args.out, args.solutions):
            print(path)

    return report_errors(command)


if __name__ == "__main__":
    sys.exit(main())
