"""A sweep's tables from its per-seed results: accuracy and loss with seed-level 95% intervals, the share of
the gap closed, and every comparison as a paired difference per seed.

Input: the *seeds table*, one row per (seed, grid point, variant) with ``accuracy`` (mean over that seed's
test items), ``loss`` (NaN where it was not stored), ``items`` (test items) and ``correct`` (items right).
Each seed is one observation (:mod:`emloc.statistics`): with 3 or 5 seeds these intervals keep their 95%,
where a bootstrap over seeds and items undercovers. With a single seed at a point there is no spread to
measure: the accuracy gets the Wilson interval over its test items (labelled ``wilson``: item noise only)
and comparisons get no interval (``within noise``).

Every comparison pairs seeds: the variants of one point, and the points of one seed, are scored on the same
test items (the test split depends on the task and the seed only).
"""
from __future__ import annotations

import math

import pandas as pd

from emloc.emulator_kinds import emulator_kind
from emloc.stages import VARIANT_SPECS
from emloc.statistics import (accuracy_interval, comparison_sentence, gap_closed_interval, paired_difference,
                              ratio_of_means_interval, seed_interval, verdict)

VARIANTS = [variant.name for variant in VARIANT_SPECS]
GAP_VARIANTS = [variant.name for variant in VARIANT_SPECS if variant.gap]
"""The variants measured by the share of the zero-shot -> LoRA-on-the-original gap they close."""
REFERENCE_METHOD = "activation_aware"
"""The emulator the baselines are compared against (EMLoC's)."""
INTERVAL_NOTE = ("95% intervals: Student-t over seeds (one observation per seed); differences paired by seed "
                 "on the same test items; one seed: Wilson over its test items, comparisons without interval")


def seeds_from_items(items: pd.DataFrame) -> pd.DataFrame:
    """The seeds table from the per-item table (``seed, axes..., variant, item, correct``); ``loss`` NaN."""
    keys = [c for c in items.columns if c not in ("item", "correct")]
    if items.empty:
        return pd.DataFrame(columns=[*keys, "accuracy", "loss", "items", "correct"])
    table = items.groupby(keys, sort=False)["correct"].agg(accuracy="mean", items="size", correct="sum")
    return table.reset_index().assign(loss=math.nan)


def transfer_variant(method: str) -> str:
    """The transfer a method is judged by: corrected where the emulator has a ``W'`` to correct."""
    return "transfer_corrected" if emulator_kind(method).corrects else "transfer_uncorrected"


def _points(seeds: pd.DataFrame, axes: list[str]):
    """``(axis values, rows)`` per grid point (the whole table when there are no axes)."""
    for key, group in seeds.groupby(axes, sort=False, dropna=False) if axes else [((), seeds)]:
        yield dict(zip(axes, key if isinstance(key, tuple) else (key,))), group


def _per_seed(rows: pd.DataFrame, variants: list[str], column: str) -> pd.DataFrame:
    """``seed x variant`` values of ``column``, only seeds that have every variant."""
    wide = rows.pivot_table(index="seed", columns="variant", values=column, dropna=False)
    missing = [v for v in variants if v not in wide.columns]
    return pd.DataFrame(columns=variants) if missing else wide[variants].dropna()


def _interval(values, seeds: int) -> tuple[float, float]:
    """The seed-level interval, NaN when a single seed leaves nothing to measure."""
    _, low, high = seed_interval(values)
    return (low, high) if seeds > 1 else (math.nan, math.nan)


def summary_table(seeds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Accuracy per (axes, variant): the mean over seeds of the seed means, its interval, counts."""
    rows = []
    for key, group in seeds.groupby([*axes, "variant"], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        mean, low, high, kind = accuracy_interval(group["accuracy"].tolist(), group["correct"].iloc[0],
                                                  group["items"].iloc[0])
        rows.append({**dict(zip([*axes, "variant"], key)), "accuracy": mean, "ci_low": low, "ci_high": high,
                     "seeds": len(group), "items": int(group["items"].sum()), "interval": kind})
    return pd.DataFrame(rows)


def _gap_row(point: dict, variant: str, values: pd.DataFrame, lower: str, upper: str, sign: float) -> dict:
    closed = gap_closed_interval(sign * values[variant], sign * values[lower], sign * values[upper])
    return {**point, "variant": variant, "gap_closed": closed["estimate"], "ci_low": closed["low"],
            "ci_high": closed["high"], "seeds": len(values), "defined": closed["defined"],
            "reason": closed["reason"]}


def gap_table(seeds: pd.DataFrame, axes: list[str], metric: str = "accuracy") -> pd.DataFrame:
    """Share of the zero-shot -> LoRA-on-the-original gap closed (ratio of means over seeds, with its
    interval; undefined, with the reason, when the gap's own interval is not above zero). ``metric``:
    ``accuracy`` (higher is better) or ``loss`` (lower is better)."""
    sign = 1.0 if metric == "accuracy" else -1.0
    rows = []
    for point, group in _points(seeds, axes):
        for variant in GAP_VARIANTS:
            values = _per_seed(group, [variant, "zero_shot", "full_lora"], metric)
            if len(values):
                rows.append(_gap_row(point, variant, values, "zero_shot", "full_lora", sign))
    return pd.DataFrame(rows)


def _difference_row(a: pd.Series, b: pd.Series, higher_is_better: bool) -> dict:
    mean, low, high = paired_difference(a, b)
    return {"difference": mean, "ci_low": low, "ci_high": high, "seeds": len(a),
            "verdict": verdict(low, high, higher_is_better)}


def correction_table(seeds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Correction on vs off: ``transfer_corrected - transfer_uncorrected`` accuracy, paired per seed."""
    rows = []
    for point, group in _points(seeds, axes):
        values = _per_seed(group, ["transfer_corrected", "transfer_uncorrected"], "accuracy")
        if len(values):
            row = _difference_row(values["transfer_corrected"], values["transfer_uncorrected"], True)
            rows.append({**point, "corrected_minus_uncorrected": row.pop("difference"), **row,
                         "within_noise": row["verdict"] == "within noise"})
    return pd.DataFrame(rows)


def baseline_table(seeds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """EMLoC against each other emulator method at the same other settings: the paired difference per seed of
    their transfers (accuracy, and loss where stored), with the verdict and the sentence to quote."""
    if "emulator.method" not in axes:
        return pd.DataFrame()
    others = [a for a in axes if a != "emulator.method"]
    rows = []
    for point, group in _points(seeds, others):
        methods = list(group["emulator.method"].unique())
        if REFERENCE_METHOD not in methods:
            continue
        ours = group[(group["emulator.method"] == REFERENCE_METHOD)
                     & (group["variant"] == transfer_variant(REFERENCE_METHOD))].set_index("seed")
        for method in (m for m in methods if m != REFERENCE_METHOD):
            theirs = group[(group["emulator.method"] == method)
                           & (group["variant"] == transfer_variant(method))].set_index("seed")
            rows += [{**point, "method": method, **row}
                     for row in _paired_metrics(ours, theirs, f"EMLoC ({REFERENCE_METHOD})", method)]
    return pd.DataFrame(rows)


def _paired_metrics(ours: pd.DataFrame, theirs: pd.DataFrame, a: str, b: str, what: str = "") -> list[dict]:
    """``a - b`` on accuracy and on loss (where stored), paired by seed (both indexed by seed): per metric the
    difference, its interval, verdict and sentence (``what`` names the variant in the sentence's metric)."""
    rows = []
    for metric, higher in (("accuracy", True), ("loss", False)):
        paired = pd.concat([ours[metric], theirs[metric]], axis=1, join="inner").dropna()
        if paired.empty:
            continue
        row = _difference_row(paired.iloc[:, 0], paired.iloc[:, 1], higher)
        sentence = comparison_sentence(a, b, (row["difference"], row["ci_low"], row["ci_high"]),
                                       f"{what} {metric}" if what else metric, higher, row["seeds"])
        rows.append({"metric": metric, **row, "sentence": sentence})
    return rows


def kept_table(seeds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Transfer kept: the share of emulator + LoRA's accuracy a transfer keeps on the original, per point (a
    ratio of means over seeds with its interval: the gap closed from 0 to ``emulator_lora``; undefined, with
    the reason, when ``emulator_lora``'s own interval is not above zero). Next to the gap closed it says
    whether what is lost is the emulator's learning or the transfer."""
    rows = []
    for point, group in _points(seeds, axes):
        for variant in ("transfer_uncorrected", "transfer_corrected"):
            values = _per_seed(group, [variant, "emulator_lora"], "accuracy")
            if not len(values):
                continue
            kept = ratio_of_means_interval(values[variant], values["emulator_lora"],
                                           denominator_name="emulator + LoRA's accuracy")
            rows.append({**point, "variant": variant, "kept": kept["estimate"], "ci_low": kept["low"],
                         "ci_high": kept["high"], "seeds": len(values), "defined": kept["defined"],
                         "reason": kept["reason"]})
    return pd.DataFrame(rows)


AXIS_VARIANTS = ["transfer_corrected", "transfer_uncorrected", "emulator_lora"]
"""The variants an axis comparison pairs: the transfers and what the emulator learned."""


def axis_table(seeds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Each axis value against the sweep's reference point (its first point) where only that axis differs:
    the paired difference per seed of every variant of :data:`AXIS_VARIANTS` (accuracy, and loss where
    stored), with the verdict and the sentence to quote (e.g. sequential against independent calibration,
    300 against 100 steps). ``emulator.method`` is left to :func:`baseline_table`."""
    compared = [a for a in axes if a != "emulator.method"]
    if seeds.empty or not compared:
        return pd.DataFrame()
    reference = seeds.iloc[0][axes].to_dict()
    rows = []
    for axis in compared:
        others = [a for a in axes if a != axis]
        rows_of = seeds[(seeds[others] == pd.Series({a: reference[a] for a in others})).all(axis=1)]
        base = rows_of[rows_of[axis] == reference[axis]]
        for value in (v for v in rows_of[axis].unique() if v != reference[axis]):
            other = rows_of[rows_of[axis] == value]
            for variant in AXIS_VARIANTS:
                rows += _axis_rows(axis, value, reference[axis], variant, other, base)
    return pd.DataFrame(rows)


def _axis_rows(axis: str, value, reference, variant: str, other: pd.DataFrame, base: pd.DataFrame) -> list:
    """The accuracy and loss rows of one variant at ``axis=value`` against the reference, paired by seed."""
    if variant not in set(other["variant"]) or variant not in set(base["variant"]):
        return []
    ours, theirs = (rows[rows["variant"] == variant].set_index("seed") for rows in (other, base))
    return [{"axis": axis, "value": value, "reference": reference, "variant": variant, **row}
            for row in _paired_metrics(ours, theirs, f"{axis}={value}", f"{axis}={reference}", variant)]


def loss_table(seeds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Mean response-token loss per (axes, variant) with its interval over seeds, and the share of the
    zero-shot -> LoRA loss gap closed (the same definition as the accuracy's)."""
    columns = [*axes, "variant", "loss", "loss_low", "loss_high", "seeds", "loss_gap_closed", "gap_low",
               "gap_high", "gap_defined", "reason"]
    stored = seeds.dropna(subset=["loss"])
    if stored.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for point, group in _points(stored, axes):
        for variant, rows_of in group.groupby("variant", sort=False):
            mean = float(rows_of["loss"].mean())
            low, high = _interval(rows_of["loss"], len(rows_of))
            gap = _loss_gap(group, variant)
            rows.append({**point, "variant": variant, "loss": mean, "loss_low": low, "loss_high": high,
                         "seeds": len(rows_of), "loss_gap_closed": gap["gap_closed"],
                         "gap_low": gap["ci_low"], "gap_high": gap["ci_high"], "gap_defined": gap["defined"],
                         "reason": gap["reason"]})
    return pd.DataFrame(rows, columns=columns)


def _loss_gap(group: pd.DataFrame, variant: str) -> dict:
    """The share of the loss gap ``variant`` closes at one point (every variant, the emulator alone too); the
    gap's two ends close none and all of it by definition."""
    ends = {"zero_shot": 0.0, "full_lora": 1.0}
    if variant in ends:
        return {"gap_closed": ends[variant], "ci_low": math.nan, "ci_high": math.nan, "defined": True,
                "reason": "the gap's own end"}
    values = _per_seed(group, [variant, "zero_shot", "full_lora"], "loss")
    if not len(values):
        return {"gap_closed": math.nan, "ci_low": math.nan, "ci_high": math.nan, "defined": False,
                "reason": "undefined: no zero-shot and full-LoRA loss on the same seeds"}
    return _gap_row({}, variant, values, "zero_shot", "full_lora", -1.0)


def wide_table(summary: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per point, one column per variant: ``"accuracy [low, high]"`` (for reading, not computing)."""
    if summary.empty:
        return pd.DataFrame(columns=[*axes, *VARIANTS])
    cells = summary.assign(cell=[f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                                 zip(summary["accuracy"], summary["ci_low"], summary["ci_high"])])
    wide = (cells.pivot(index=axes, columns="variant", values="cell") if axes
            else cells.set_index("variant")[["cell"]].T)
    ordered = [v for v in VARIANTS if v in wide.columns]
    return wide[ordered].fillna("").reset_index()


def summary_figure(summary: pd.DataFrame, axes: list[str],
                   title: str = "Accuracy (95% interval over seeds)"):
    """Grouped bars per variant over the axis combinations, with asymmetric error bars."""
    import plotly.graph_objects as go
    label = (summary[axes].astype(str).agg(", ".join, axis=1) if axes
             else pd.Series("all", index=summary.index))
    figure = go.Figure()
    for variant, rows in summary.assign(label=label).groupby("variant", sort=False):
        figure.add_bar(name=variant, x=rows["label"], y=rows["accuracy"],
                       error_y={"type": "data", "symmetric": False,
                                "array": rows["ci_high"] - rows["accuracy"],
                                "arrayminus": rows["accuracy"] - rows["ci_low"]})
    figure.update_layout(barmode="group", title=title, yaxis_title="exact-match accuracy",
                         xaxis_title=", ".join(axes))
    return figure


def all_tables(seeds: pd.DataFrame, axes: list[str]) -> dict[str, pd.DataFrame]:
    """Every table of a sweep from its seeds table."""
    summary = summary_table(seeds, axes)
    return {"seeds": seeds, "summary": summary, "gap": gap_table(seeds, axes),
            "correction": correction_table(seeds, axes), "baselines": baseline_table(seeds, axes),
            "kept": kept_table(seeds, axes), "axes": axis_table(seeds, axes),
            "loss": loss_table(seeds, axes), "wide": wide_table(summary, axes)}


def as_markdown(table: pd.DataFrame) -> str:
    """A table for reading, with the intervals' definition under it."""
    return table.to_markdown(index=False, floatfmt=".3f") + f"\n\n{INTERVAL_NOTE}.\n"

