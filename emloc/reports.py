"""Inspection tables read from saved stage artifacts (cached spectra, reports, results).

Pure functions for widgets, notebooks and scripts: nothing here loads a model or recomputes a
decomposition. Notation as in DESIGN §2: ``sigma`` are singular values (whitened: of ``W S``,
plain: of ``W``), ``rho`` the parameter-retention ratio, ``r`` a rank.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from emloc.lowrank import break_even_rank, rank_from_ratio, relative_error_curve

SPECTRUM_KINDS = ("whitened", "plain")
# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (larger df use the normal 1.96).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


# ---- spectra ---------------------------------------------------------------------------------

def spectrum_curves(sigma: torch.Tensor) -> dict[str, np.ndarray]:
    """Curves of one spectrum ``sigma`` (``n``, descending), as numpy arrays for plotting.

    ``sigma`` and ``normalised = sigma_i / sigma_1`` have ``n`` entries; ``error[k]`` (relative error of
    keeping the top ``k``, :func:`~emloc.lowrank.relative_error_curve`) and ``kept_energy[k] = 1 - error[k]^2``
    have ``n + 1`` entries, ``k = 0..n``.
    """
    values = sigma.double()
    error = relative_error_curve(values)
    top = float(values[0]) if len(values) and float(values[0]) > 0 else 1.0
    return {"sigma": values.numpy(), "normalised": (values / top).numpy(), "error": error.numpy(),
            "kept_energy": (1.0 - error.pow(2)).numpy()}


def error_curves(spectra: dict[str, dict[str, torch.Tensor]], kind: str = "whitened") -> dict[str, np.ndarray]:
    """``module -> error[k]`` for every module, from the cached spectra (computed once per widget).

    ``kind='whitened'``: the relative calibration error ``||(W - W') X||_F / ||W X||_F`` of the
    activation-aware rank-``k`` emulator. ``kind='plain'``: the relative weight error
    ``||W - W'||_F / ||W||_F`` of plain truncated SVD.
    """
    if kind not in SPECTRUM_KINDS:
        raise ValueError(f"kind must be one of {SPECTRUM_KINDS}, got {kind!r}")
    return {name: relative_error_curve(d[kind]).numpy() for name, d in spectra.items()}


def rank_summary(curves: dict[str, np.ndarray], rank: int, out_features: int, in_features: int) -> dict:
    """Numbers for keeping ``rank`` of one module's spectrum (``curves`` from :func:`spectrum_curves`).

    ``ratio`` is the ``rho`` whose rule gives about this rank, ``r / (out*in/(out+in))``;
    ``parameter_share`` is ``r (out + in) / (out in)``, the share of ``W``'s parameters kept.
    """
    k = min(max(int(rank), 0), len(curves["error"]) - 1)
    return {"rank": k, "error": float(curves["error"][k]), "kept_energy": float(curves["kept_energy"][k]),
            "ratio": k / break_even_rank(out_features, in_features),
            "parameter_share": k * (out_features + in_features) / (out_features * in_features)}


# ---- the emulator at another ratio -----------------------------------------------------------

def errors_at_ratio(report: pd.DataFrame, curves: dict[str, np.ndarray], rho: float) -> pd.DataFrame:
    """Per module, what the emulator would be at ratio ``rho``, read from the error curves.

    ``report`` is the build report (``module, layer, type, out_features, in_features, params_before``);
    returns ``module, layer, type, rank, error, params_before, params_after, params_saved``.
    """
    out_f, in_f = report["out_features"].to_numpy(), report["in_features"].to_numpy()
    ranks = np.array([min(rank_from_ratio(rho, int(o), int(i)), len(curves[m]) - 1)
                      for m, o, i in zip(report["module"], out_f, in_f)])
    errors = np.array([curves[m][k] for m, k in zip(report["module"], ranks)])
    bias = report["params_before"].to_numpy() - out_f * in_f
    params_after = ranks * (out_f + in_f) + bias
    return pd.DataFrame({"module": report["module"], "layer": report["layer"], "type": report["type"], "rank": ranks,
                         "error": errors, "params_before": report["params_before"], "params_after": params_after,
                         "params_saved": report["params_before"].to_numpy() - params_after})


def errors_at_ranks(report: pd.DataFrame, curves: dict[str, np.ndarray], ranks: dict[str, int]) -> pd.DataFrame:
    """As :func:`errors_at_ratio`, for given per-module ``ranks`` (e.g. a global allocation,
    :func:`emloc.allocation.allocation_at_ratio`) instead of the ones ``rho`` picks."""
    out_f, in_f = report["out_features"].to_numpy(), report["in_features"].to_numpy()
    chosen = np.array([min(int(ranks[m]), len(curves[m]) - 1) for m in report["module"]])
    errors = np.array([curves[m][k] for m, k in zip(report["module"], chosen)])
    params_after = chosen * (out_f + in_f) + report["params_before"].to_numpy() - out_f * in_f
    return pd.DataFrame({"module": report["module"], "layer": report["layer"], "type": report["type"], "rank": chosen,
                         "error": errors, "params_before": report["params_before"], "params_after": params_after,
                         "params_saved": report["params_before"].to_numpy() - params_after})


def layer_grid(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """``table[column]`` as a layers x module-types grid (types in their order of appearance)."""
    types = list(dict.fromkeys(table["type"]))
    return table.pivot(index="layer", columns="type", values=column).reindex(columns=types).sort_index()


# ---- correction ------------------------------------------------------------------------------

def misalignment_by_layer(report: pd.DataFrame, module_type: str | None = None) -> pd.DataFrame:
    """The correction report per layer: mean misalignment before/after over the layer's modules
    (or one ``module_type``), clamped columns out of all columns, and modules with any clamped column."""
    rows = report if module_type is None else report[report["type"] == module_type]
    if rows.empty:
        raise ValueError(f"no module of type {module_type!r} in the correction report")
    grouped = rows.assign(any_clamped=rows["clamped_columns"] > 0).groupby("layer")
    table = grouped.agg(misalignment_before=("misalignment_before", "mean"),
                        misalignment_after=("misalignment_after", "mean"),
                        clamped_columns=("clamped_columns", "sum"), columns=("columns", "sum"),
                        modules_clamped=("any_clamped", "sum"), modules=("module", "count"))
    table["clamped_share"] = table["clamped_columns"] / table["columns"].clip(lower=1)
    return table


def compensation_by_layer(report: pd.DataFrame, module_type: str | None = None) -> pd.DataFrame:
    """Per layer, the mean of the saved diagnostics: ``update_mismatch_coefficient`` (``c`` in
    ``s B~ ~ c (W - W') Q``: the share of the emulator's error the adapter learned to compensate; 1 = all)
    and ``update_mismatch_cosine``."""
    rows = report if module_type is None else report[report["type"] == module_type]
    if rows.empty:
        raise ValueError(f"no module of type {module_type!r} in the correction report")
    return rows.groupby("layer")[["update_mismatch_coefficient", "update_mismatch_cosine"]].mean()


# ---- results ---------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (one seed: accuracy on ``n`` test items)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_interval(values: list[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean of ``values`` (several seeds); a point when only one."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()), float(x.mean()))
    t = _T95[len(x) - 2] if len(x) - 1 <= len(_T95) else 1.96
    half = t * x.std(ddof=1) / math.sqrt(len(x))
    return (float(x.mean() - half), float(x.mean() + half))


def variant_summary(results: dict | list[dict]) -> pd.DataFrame:
    """Accuracy and loss per variant with 95% intervals, from one ``results.json`` or one per seed.

    Several seeds: Student-t interval of the mean over seeds. One seed: Wilson interval of the
    accuracy over the test items, and no interval for the loss. Columns: ``accuracy, accuracy_low,
    accuracy_high, loss, loss_low, loss_high, seeds, n, interval``.
    """
    runs = [results] if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("variant_summary needs at least one results dict")
    order = [v for v in runs[0]["variants"] if all(v in r["variants"] for r in runs)]
    rows = {}
    for variant in order:
        acc = [r["variants"][variant]["accuracy"] for r in runs]
        loss = [r["variants"][variant]["loss"] for r in runs]
        n = int(runs[0]["variants"][variant]["n"])
        if len(runs) == 1:
            acc_ci, loss_ci, kind = wilson_interval(round(acc[0] * n), n), (loss[0], loss[0]), "wilson"
        else:
            acc_ci, loss_ci, kind = t_interval(acc), t_interval(loss), "t"
        rows[variant] = {"accuracy": float(np.mean(acc)), "accuracy_low": acc_ci[0], "accuracy_high": acc_ci[1],
                         "loss": float(np.mean(loss)), "loss_low": loss_ci[0], "loss_high": loss_ci[1],
                         "seeds": len(runs), "n": n, "interval": kind}
    return pd.DataFrame.from_dict(rows, orient="index")


def memory_table(results: dict) -> pd.DataFrame:
    """Parameters and weight memory (MB at the run's dtype) of the original model and the emulator."""
    dtype = results.get("config", {}).get("dtype", "float32")
    size = BYTES_PER_PARAMETER.get(dtype, 4)
    params = results["parameters"]
    table = pd.DataFrame({"parameters": [params["original"], params["emulator"]]}, index=["original", "emulator"])
    table["megabytes"] = table["parameters"] * size / 2**20
    table["share_of_original"] = table["parameters"] / params["original"]
    return table
