"""Inspection tables read from saved stage artifacts (cached spectra, reports, results).

Pure functions for widgets, notebooks and scripts: nothing here loads a model or recomputes a
decomposition. Notation as in docs/architecture.md: ``sigma`` are singular values (whitened: of ``W S``,
plain: of ``W``), ``rho`` the parameter-retention ratio, ``r`` a rank.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from emloc.lowrank import break_even_rank, rank_from_ratio, relative_error_curve
from emloc.statistics import accuracy_interval, gap_closed_interval, seed_interval

SPECTRUM_KINDS = ("whitened", "plain")
BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


# ---- spectra ---------------------------------------------------------------------------------

def spectrum_curves(sigma: torch.Tensor) -> dict[str, np.ndarray]:
    """Curves of one spectrum ``sigma`` (``n``, descending), as numpy arrays for plotting.

    ``sigma`` and ``normalised = sigma_i / sigma_1`` have ``n`` entries; ``error[k]`` (relative error of
    keeping the top ``k``, :func:`~emloc.lowrank.relative_error_curve`) and
    ``kept_energy[k] = 1 - error[k]^2`` have ``n + 1`` entries, ``k = 0..n``.
    """
    values = sigma.double()
    error = relative_error_curve(values)
    top = float(values[0]) if len(values) and float(values[0]) > 0 else 1.0
    return {"sigma": values.numpy(), "normalised": (values / top).numpy(), "error": error.numpy(),
            "kept_energy": (1.0 - error.pow(2)).numpy()}


def error_curves(spectra: dict[str, dict[str, torch.Tensor]],
                 kind: str = "whitened") -> dict[str, np.ndarray]:
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
    return pd.DataFrame({"module": report["module"], "layer": report["layer"], "type": report["type"],
                         "rank": ranks, "error": errors, "params_before": report["params_before"],
                         "params_after": params_after,
                         "params_saved": report["params_before"].to_numpy() - params_after})


def errors_at_ranks(report: pd.DataFrame, curves: dict[str, np.ndarray],
                    ranks: dict[str, int]) -> pd.DataFrame:
    """As :func:`errors_at_ratio`, for given per-module ``ranks`` (e.g. a global allocation,
    :func:`emloc.allocation.allocation_at_ratio`) instead of the ones ``rho`` picks."""
    out_f, in_f = report["out_features"].to_numpy(), report["in_features"].to_numpy()
    chosen = np.array([min(int(ranks[m]), len(curves[m]) - 1) for m in report["module"]])
    errors = np.array([curves[m][k] for m, k in zip(report["module"], chosen)])
    params_after = chosen * (out_f + in_f) + report["params_before"].to_numpy() - out_f * in_f
    return pd.DataFrame({"module": report["module"], "layer": report["layer"], "type": report["type"],
                         "rank": chosen, "error": errors, "params_before": report["params_before"],
                         "params_after": params_after,
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

def variant_summary(results: dict | list[dict], correct: dict | list[dict] | None = None,
                    confidence: float = 0.95) -> pd.DataFrame:
    """Accuracy and loss per variant with 95% intervals, from one ``results.json`` or one per seed.

    Several seeds: each seed is one observation, Student-t over the per-seed values (:mod:`emloc.statistics`,
    the intervals the sweeps use; they keep their 95% with 3 or 5 seeds). One seed: the accuracy gets the
    Wilson interval over its test items (item noise only; ``correct``, that seed's ``variant -> 0/1 per
    test item`` from :func:`emloc.evaluation.item_correctness`, gives the exact count) and the loss none.
    Columns: ``accuracy, accuracy_low, accuracy_high, loss, loss_low, loss_high, seeds, n, interval`` (of the
    accuracy: ``t`` or ``wilson``), ``loss_interval`` (``t`` or ``none``), ``loss_gap_closed``
    (:func:`loss_gap_closed`, on the mean losses: a ratio of means) and, with several seeds, its interval
    ``loss_gap_low, loss_gap_high`` (NaN with the reason in ``loss_gap_note`` when the gap's own interval is
    not above zero).
    """
    runs = [results] if isinstance(results, dict) else list(results)
    items = None if correct is None else ([correct] if isinstance(correct, dict) else list(correct))
    if not runs:
        raise ValueError("variant_summary needs at least one results dict")
    if items is not None and len(items) != len(runs):
        raise ValueError(f"variant_summary got {len(runs)} results but {len(items)} per-item correctness "
                         f"records: give one per seed, in the same order")
    order = [v for v in runs[0]["variants"] if all(v in r["variants"] for r in runs)]
    per_seed = {v: pd.DataFrame([r["variants"][v] for r in runs]) for v in order}
    rows = {}
    for variant, values in per_seed.items():
        n = int(values["n"].iloc[0])
        first = values["accuracy"].iloc[0]  # one seed: its right answers counted, or recovered from the mean
        right = sum(items[0][variant]) if items is not None else round(first * n)
        accuracy, *acc_ci, kind = accuracy_interval(values["accuracy"].tolist(), right, n, confidence)
        loss, *loss_ci = seed_interval(values["loss"], confidence)
        rows[variant] = {"accuracy": accuracy, "accuracy_low": acc_ci[0], "accuracy_high": acc_ci[1],
                         "loss": loss, "loss_low": loss_ci[0], "loss_high": loss_ci[1],
                         "seeds": len(runs), "n": n, "interval": kind,
                         "loss_interval": "none" if len(runs) == 1 else "t"}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table["loss_gap_closed"] = loss_gap_closed(table["loss"])
    table = table.join(_loss_gap_intervals({v: values["loss"] for v, values in per_seed.items()}, confidence))
    undefined = table["loss_gap_note"].str.startswith("undefined")
    table.loc[undefined, "loss_gap_closed"] = np.nan  # a ratio over a gap that may be zero means nothing
    return table


def _loss_gap_intervals(losses: dict[str, pd.Series], confidence: float) -> pd.DataFrame:
    """Per variant, the interval of the loss gap closed over seeds (lower loss is better: negated)."""
    rows = {}
    for variant, loss in losses.items():
        if len(loss) < 2 or not {"zero_shot", "full_lora"} <= set(losses):
            rows[variant] = {"loss_gap_low": np.nan, "loss_gap_high": np.nan,
                             "loss_gap_note": "one seed: no interval" if len(loss) < 2 else "no reference"}
            continue
        closed = gap_closed_interval(-loss.to_numpy(), -losses["zero_shot"].to_numpy(),
                                     -losses["full_lora"].to_numpy(), confidence)
        rows[variant] = {"loss_gap_low": closed["low"], "loss_gap_high": closed["high"],
                         "loss_gap_note": closed["reason"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def loss_gap_closed(loss: pd.Series, lower: str = "zero_shot", upper: str = "full_lora") -> pd.Series:
    """Per variant, the share of the zero-shot -> full-LoRA loss gap it closed:
    ``(L_zero - L) / (L_zero - L_full)``.

    ``loss``: mean response-token loss per variant (index: variant names). 0 is the zero-shot model, 1 LoRA on
    the original; below 0 is worse than zero-shot, above 1 better than full LoRA. It shows what a short
    training taught a variant when exact-match accuracy is still 0 for all of them. NaN everywhere when the
    gap is undefined: a reference variant is missing, a loss is not finite, or full LoRA did not lower the
    loss (``L_full >= L_zero``: no gap to close).
    """
    loss = loss.astype(float)
    if lower not in loss.index or upper not in loss.index:
        return pd.Series(np.nan, index=loss.index)
    gap = loss[lower] - loss[upper]
    if not np.isfinite(gap) or gap <= 0:
        return pd.Series(np.nan, index=loss.index)
    return (loss[lower] - loss) / gap


def memory_table(results: dict) -> pd.DataFrame:
    """Parameters and weight memory (MB at the run's dtype) of the original model and the emulator."""
    dtype = results.get("config", {}).get("dtype", "float32")
    size = BYTES_PER_PARAMETER.get(dtype, 4)
    params = results["parameters"]
    table = pd.DataFrame({"parameters": [params["original"], params["emulator"]]},
                         index=["original", "emulator"])
    table["megabytes"] = table["parameters"] * size / 2**20
    table["share_of_original"] = table["parameters"] / params["original"]
    return table


MEMORY_STAGES = {"inference_original": "inference, original", "lora_original": "LoRA on the original",
                 "lora_emulator": "LoRA on the emulator",
                 "lora_original_no_checkpointing": "LoRA on the original, no checkpointing",
                 "lora_emulator_no_checkpointing": "LoRA on the emulator, no checkpointing"}


def measured_memory(memory: dict) -> pd.DataFrame:
    """The training and inference rows of ``benchmarks/bench_memory.py``'s ``memory.json``: peak resident
    memory (MB, fresh process), its ratio to inference with the original, the ledger's prediction and seconds
    per step."""
    rows = {r["stage"]: r for r in memory["stages"] + memory.get("variants", [])
            if r["stage"] in MEMORY_STAGES}
    inference = rows["inference_original"]["peak_rss_mb"]
    table = pd.DataFrame([{"stage": MEMORY_STAGES[name], "peak_rss_mb": rows[name]["peak_rss_mb"],
                           "over_inference": rows[name]["peak_rss_mb"] / inference,
                           "predicted_peak_mb": rows[name].get("predicted_peak_mb", float("nan")),
                           "s_per_step": rows[name].get("s_per_step", float("nan"))}
                          for name in MEMORY_STAGES if name in rows])
    return table.set_index("stage")


def memory_headline(memory: dict, *memory_big: dict) -> pd.DataFrame:
    """EMLoC's headline, measured: peak resident memory (MB, fresh process) of inference with the original and
    of LoRA on the emulator, per model, with the ratio to inference. ``memory`` is ``bench_memory.py``'s
    ``memory.json`` (the default model); each ``memory_big`` one of its ``memory_big*.json`` (the
    weights-dominated model, one per dtype), whose peaks are counted once the model is loaded
    (``running_peak_mb``: the sharded loader's transient is not the stage's)."""
    rows = {r["stage"]: r for r in memory["stages"]}
    models = [("default model, float32", rows["inference_original"], rows["lora_emulator"])]
    for big_run in memory_big:
        big = {r["stage"]: r for r in big_run["stages"]}
        name = f"{big_run['parameters'] / 1e9:.1f}B random Llama, {big_run['dtype']}"
        models.append((name, big["big_inference_original"], big["big_lora_emulator"]))

    def peak(row):
        return row.get("running_peak_mb", row["peak_rss_mb"])

    table = pd.DataFrame([{"model": model, "stage": stage, "peak_rss_mb": peak(row),
                           "over_inference": peak(row) / peak(inference)}
                          for model, inference, lora in models
                          for stage, row in (("inference, original", inference),
                                             ("LoRA on the emulator", lora))])
    return table


def seed_summary(rows: pd.DataFrame, by: list[str], metrics: list[str],
                 bounds: tuple[float, float] | None = (0.0, 1.0)) -> pd.DataFrame:
    """One row per ``by`` group and metric: ``mean``, ``low``, ``high`` (95% Student-t over the seeds, each
    seed one value: :func:`emloc.statistics.seed_interval`) and ``seeds``, from ``rows`` holding one row per
    seed (a ``seed`` column) and group. ``bounds``: the range the metrics lie in (shares: 0 to 1)."""
    out = []
    for key, group in rows.groupby(by, sort=False):
        for metric in metrics:
            mean, low, high = seed_interval(group[metric].tolist(), bounds=bounds)
            out.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "metric": metric,
                        "mean": mean, "low": low, "high": high, "seeds": group["seed"].nunique()})
    return pd.DataFrame(out)
