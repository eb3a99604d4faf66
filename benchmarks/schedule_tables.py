"""The paper's schedule (issue 24, part c): LoRA for 300 steps next to the standard preset's 100, from the stored
sweeps -> benchmarks/results/schedule/.

    python benchmarks/schedule_tables.py

Sources (each a sweep's stored tables, 5 seeds, 32-true): ``sweep_addition_5seeds`` (addition, 100 steps, ratio
0.5; its EMLoC rows), ``sweep_addition_5seeds_ratio``, ``_ratio075`` and ``_ratio025`` (ratio 0.4, 0.75 and
0.25, 100 steps), ``sweep_addition_5seeds_calibration16`` and ``_calibration256`` (16 and 256 calibration samples
instead of 64, 100 steps), ``schedule_addition`` (300 steps: ratio 0.5 and 0.4, the three correction methods, sequential
calibration) and ``schedule_wordfacts`` (wordfacts at 300 and 100 steps). A source's settings that are not axes of its sweep are read from its provenance record,
so every row names its task, ratio, steps, correction method and calibration. Points with the same seed share
the test items, so differences are paired by seed.

Writes ``table.md``/``.csv`` (per point: the accuracy of every variant, the share of the gap the corrected transfer
closes, the share of emulator + LoRA's accuracy it keeps, its loss gap closed and the correction's effect, each
with its 95% interval), ``findings.md``/``.csv`` (the sentences the docs quote, produced from the intervals),
``correction_methods.md`` (the three correction methods at 300 steps, for docs/correction.md),
``calibration.md`` (sequential against independent calibration at 300 steps, for docs/sequential.md),
``clamp.md``/``.csv`` and ``clamp_findings.md`` (the correction's clamp lambda at 50, 100 and 300 steps, from
:data:`CLAMP_SOURCES`, for docs/correction.md), ``ratio.md`` and ``calibration_size.md`` (every ratio against
0.5 and every calibration size against 64 at 100 steps, paired by seed), and the
sweep tables of the combined seeds (``gap``, ``kept``, ``loss``, ``correction``, ``axes``: one-axis comparisons
against 300 steps at ratio 0.5, official correction, independent calibration).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402

from emloc import provenance, sweep_tables, sweeps  # noqa: E402

OUT = RESULTS / "schedule"
SOURCES = ["schedule_addition", "schedule_wordfacts", "sweep_addition_5seeds", "sweep_addition_5seeds_ratio",
           "sweep_addition_5seeds_ratio075", "sweep_addition_5seeds_ratio025", "sweep_addition_5seeds_calibration16",
           "sweep_addition_5seeds_calibration256"]
AXES = {"task": ("data", "task"), "emulator.ratio": ("emulator", "ratio"), "lora.steps": ("lora", "steps"),
        "correction.method": ("correction", "method"), "emulator.calibration": ("emulator", "calibration"),
        "data.n_calibration": ("data", "n_calibration")}
"""The columns every row gets, and where a source that does not vary one finds its value (its resolved config)."""
REFERENCE = {"emulator.ratio": 0.5, "lora.steps": 300, "correction.method": "official",
             "emulator.calibration": "independent", "data.n_calibration": 64}
"""The point each one-axis comparison is made against: the paper's schedule at ratio 0.5, today's defaults."""
HALF = 0.5


def source_seeds(name: str) -> pd.DataFrame:
    """A source sweep's per-seed results with a value on every axis of :data:`AXES` (EMLoC rows only)."""
    folder = RESULTS / name
    seeds = pd.read_csv(folder / "seeds.csv")
    if "emulator.method" in seeds:
        seeds = seeds[seeds["emulator.method"] == sweep_tables.REFERENCE_METHOD].drop(columns="emulator.method")
    resolved = next(iter(provenance.read(folder)["configs"].values()))["resolved"]
    for column, (section, key) in AXES.items():
        if column not in seeds:
            seeds[column] = resolved[section][key]
    return seeds


def combined_seeds(sources: list[str]) -> pd.DataFrame:
    """Every finished source, the reference point's rows first (the sweep tables compare against the first)."""
    frames = [source_seeds(name) for name in sources if (RESULTS / name / "seeds.csv").exists()]
    seeds = pd.concat(frames, ignore_index=True)
    at_reference = _matching(seeds, REFERENCE)
    return pd.concat([seeds[at_reference], seeds[~at_reference]], ignore_index=True)


def _cell(mean: float, low: float, high: float) -> str:
    return "" if pd.isna(mean) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _share(row: pd.Series, column: str) -> str:
    return _cell(row[column], row["ci_low"], row["ci_high"]) if row["defined"] else row["reason"]


def _effect(row: pd.Series, column: str = "difference") -> str:
    """A paired difference with its interval and verdict, e.g. ``0.012 [-0.108, 0.133] within noise``."""
    return f"{_cell(row[column], row['ci_low'], row['ci_high'])} {row['verdict']}"


def _matching(table: pd.DataFrame, values: dict) -> pd.Series:
    """Rows of ``table`` whose columns hold ``values``."""
    return (table[list(values)] == pd.Series(values)).all(axis=1)


def _loss_share(row: pd.Series) -> str:
    return (_cell(row["loss_gap_closed"], row["gap_low"], row["gap_high"]) if row["gap_defined"]
            else row["reason"])


def point_table(tables: dict[str, pd.DataFrame], axes: list[str]) -> pd.DataFrame:
    """One row per point: accuracy per variant, gap closed, transfer kept, loss gap closed, correction effect."""
    summary = tables["summary"].set_index([*axes, "variant"])
    gap = tables["gap"].set_index([*axes, "variant"])
    kept = tables["kept"].set_index([*axes, "variant"])
    loss = tables["loss"].set_index([*axes, "variant"])
    correction = tables["correction"].set_index(axes)
    rows = []
    for point in summary.index.droplevel("variant").unique():
        accuracy = {v: _cell(*summary.loc[(*point, v), ["accuracy", "ci_low", "ci_high"]])
                    for v in ("emulator_lora", "transfer_uncorrected", "transfer_corrected", "full_lora")
                    if (*point, v) in summary.index}
        corrected = (*point, "transfer_corrected")
        effect = correction.loc[point]
        rows.append({**dict(zip(axes, point)), **accuracy,
                     "gap closed (corrected)": _share(gap.loc[corrected], "gap_closed"),
                     "transfer kept (corrected)": _share(kept.loc[corrected], "kept"),
                     "loss gap closed (corrected)": _loss_share(loss.loc[corrected]),
                     "correction on - off": _effect(effect, "corrected_minus_uncorrected"),
                     "seeds": int(summary.loc[corrected, "seeds"])})
    return pd.DataFrame(rows)


def methods_table(tables: dict[str, pd.DataFrame], axes: list[str]) -> pd.DataFrame:
    """The three correction methods on the same 300-step adapters: each one's corrected transfer, its effect
    against no correction and against the official method, paired by seed (for docs/correction.md)."""
    others = {axis: REFERENCE[axis] for axis in axes if axis != "correction.method"}
    summary = tables["summary"][_matching(tables["summary"], {**others, "variant": "transfer_corrected"})]
    summary = summary.set_index("correction.method")
    effects = tables["correction"][_matching(tables["correction"], others)].set_index("correction.method")
    against = tables["axes"]
    if len(against):
        against = against[(against["axis"] == "correction.method") & (against["variant"] == "transfer_corrected")
                          & (against["metric"] == "accuracy")].set_index("value")
    rows = []
    for method in summary.index:
        effect = effects.loc[method]
        row = {"correction.method": method, "seeds": int(summary.loc[method, "seeds"]),
               "transfer corrected": _cell(*summary.loc[method, ["accuracy", "ci_low", "ci_high"]]),
               "corrected - uncorrected": _effect(effect, "corrected_minus_uncorrected")}
        if method in against.index:
            row["minus official"] = _effect(against.loc[method])
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def calibration_table(axes_table: pd.DataFrame) -> pd.DataFrame:
    """Sequential against independent calibration at 300 steps, paired by seed (for docs/sequential.md): per
    variant and metric the difference with its interval and verdict; no rows until sequential points land."""
    columns = ["variant", "metric", "sequential - independent", "seeds"]
    if axes_table.empty:
        return pd.DataFrame(columns=columns)
    rows = axes_table[(axes_table["axis"] == "emulator.calibration") & (axes_table["value"] == "sequential")]
    return pd.DataFrame({"variant": rows["variant"], "metric": rows["metric"],
                         "sequential - independent": [_effect(row) for _, row in rows.iterrows()],
                         "seeds": rows["seeds"]}, columns=columns)


CLAMP_SOURCES = {("addition", 100): "clamp_100steps",
                 ("addition", 300): "schedule_clamp", ("wordfacts", 50): "clamp_50steps_wordfacts",
                 ("wordfacts", 100): "clamp_100steps_wordfacts", ("wordfacts", 300): "schedule_clamp_wordfacts"}
"""The clamp sweeps per (task, LoRA steps): at 50 (wordfacts only: addition learns nothing in 50 steps) and 100
steps ``benchmarks/grids/clamp_*steps*.yaml`` train their own adapters; at 300 steps ``schedule_clamp*.yaml``
reuse the schedule sweeps' adapters."""


def _lambda(value) -> str:
    """3.0 -> "3"; "none" (no clamp) as it is."""
    return f"{float(value):g}" if str(value) != sweeps.NO_VALUE else str(value)


def clamp_tidy(folder: Path) -> pd.DataFrame:
    """A clamp sweep's numbers, one row per lambda (``clamp.csv``, for notebooks): the corrected transfer's
    accuracy, its difference to no correction (``minus_uncorrected``) and to the sweep's first lambda, today's
    (``minus_reference``; none on that lambda's own row), each with its interval and verdict."""
    summary, effects, axes = (pd.read_csv(folder / f"{name}.csv") for name in ("summary", "correction", "axes"))
    corrected = summary[summary["variant"] == "transfer_corrected"]
    against = axes[(axes["variant"] == "transfer_corrected") & (axes["metric"] == "accuracy")]
    against = {_lambda(row["value"]): row for _, row in against.iterrows()}
    on_off = {_lambda(row["correction.clamp"]): row.rename({"corrected_minus_uncorrected": "difference"})
              for _, row in effects.iterrows()}
    reference = _lambda(corrected["correction.clamp"].iloc[0])
    rows = []
    for _, row in corrected.iterrows():
        value = _lambda(row["correction.clamp"])
        entry = {"clamp_lambda": value, "seeds": int(row["seeds"]), "accuracy": row["accuracy"],
                 "ci_low": row["ci_low"], "ci_high": row["ci_high"], "reference_lambda": reference}
        for prefix, effect in (("minus_uncorrected", on_off.get(value)), ("minus_reference", against.get(value))):
            if effect is not None:
                entry |= {prefix: effect["difference"], f"{prefix}_low": effect["ci_low"],
                          f"{prefix}_high": effect["ci_high"], f"{prefix}_verdict": effect["verdict"]}
        rows.append(entry)
    return pd.DataFrame(rows)


def _difference_text(row: pd.Series, prefix: str) -> str:
    """``minus_uncorrected`` or ``minus_reference`` of a :func:`clamp_tidy` row as ``mean [low, high] verdict``."""
    if pd.isna(row.get(prefix)):
        return ""
    return f"{_cell(row[prefix], row[f'{prefix}_low'], row[f'{prefix}_high'])} {row[f'{prefix}_verdict']}"


def clamp_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """The correction's clamp lambda (for docs/correction.md) from :func:`clamp_tidy`: per value its corrected
    transfer, its effect against no correction and against today's lambda (the sweep's first value)."""
    reference = tidy["reference_lambda"].iloc[0]
    return pd.DataFrame([{"clamp lambda": row["clamp_lambda"], "seeds": int(row["seeds"]),
                          "transfer corrected": _cell(row["accuracy"], row["ci_low"], row["ci_high"]),
                          "corrected - uncorrected": _difference_text(row, "minus_uncorrected"),
                          f"minus lambda {reference}": _difference_text(row, "minus_reference")}
                         for _, row in tidy.iterrows()])


def clamp_findings(tidy: pd.DataFrame) -> list[str]:
    """Two sentences from :func:`clamp_tidy`'s verdicts: which lambdas beat, match or lose to no correction, and
    to today's."""
    def grouped(verdicts: pd.Series, other: str) -> str:
        by_word = {}
        for value, word in verdicts.dropna().items():
            by_word.setdefault(word, []).append(f"lambda {value}" if value != "none" else "no clamp")
        parts = []
        for word, values in by_word.items():
            one = len(values) == 1
            names = values[0] if one else f"{', '.join(values[:-1])} and {values[-1]}"
            verb = {"beats": "beats" if one else "beat", "within noise": f"{'is' if one else 'are'} within noise of",
                    "worse": f"{'is' if one else 'are'} worse than"}[word]
            parts.append(f"{names} {verb} {other}")
        return "; ".join(parts)

    by_lambda = tidy.set_index("clamp_lambda")
    reference = tidy["reference_lambda"].iloc[0]
    return [f"corrected transfer: {grouped(by_lambda['minus_uncorrected_verdict'], 'no correction')}",
            f"corrected transfer: {grouped(by_lambda['minus_reference_verdict'], f'lambda {reference} (today)')}"]


def clamp_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``clamp.md``'s table (task, steps, then :func:`clamp_table`), ``clamp.csv``'s numbers (:func:`clamp_tidy`)
    and the findings, over the clamp sweeps stored so far (each read once)."""
    tables, tidies, findings = [], [], []
    for (task, steps), name in sorted(CLAMP_SOURCES.items()):
        folder = RESULTS / name
        if (folder / "summary.csv").exists():
            tidy = clamp_tidy(folder)
            tables.append(_first(clamp_table(tidy).assign(task=task, steps=steps), "task", "steps"))
            tidies.append(_first(tidy.assign(task=task, steps=steps), "task", "steps"))
            findings += [{"task": task, "steps": steps, "finding": f} for f in clamp_findings(tidy)]
    if not tables:
        return pd.DataFrame(), pd.DataFrame(), pd.DataFrame()
    return (pd.concat(tables, ignore_index=True), pd.concat(tidies, ignore_index=True),
            pd.DataFrame(findings))


def half_gap_findings(tables: dict[str, pd.DataFrame], axes: list[str]) -> list[str]:
    """Where the corrected transfer closes half the accuracy gap (its interval above 0.5, or its estimate only),
    how much of emulator + LoRA's accuracy it keeps, and whether the correction helps there; one sentence per
    point, from the intervals."""
    findings = []
    effects = tables["correction"].set_index(axes)
    kept = tables["kept"].set_index([*axes, "variant"])
    for _, row in tables["gap"][tables["gap"]["variant"] == "transfer_corrected"].iterrows():
        point = tuple(row[a] for a in axes)
        where = ", ".join(f"{a}={row[a]}" for a in axes)
        if not row["defined"]:
            findings.append(f"{where}: gap closed {row['reason']}")
            continue
        share = _cell(row["gap_closed"], row["ci_low"], row["ci_high"])
        if row["ci_low"] > HALF:
            said = f"the corrected transfer closes more than half the gap: {share}"
        elif row["gap_closed"] >= HALF:
            said = f"the corrected transfer's estimate reaches half the gap but its interval does not: {share}"
        elif row["ci_high"] < HALF:
            said = f"the corrected transfer closes less than half the gap: {share}"
        else:
            said = f"undecided whether the corrected transfer closes half the gap: {share}"
        said += f"; it keeps {_share(kept.loc[(*point, 'transfer_corrected')], 'kept')} of emulator + LoRA's accuracy"
        effect = effects.loc[point]
        said += (f"; correction on - off {_cell(effect['corrected_minus_uncorrected'], effect['ci_low'], effect['ci_high'])}"
                 f" ({effect['verdict']})")
        findings.append(f"{where}: {said}")
    return findings


def steps_at_other_ratios(rows: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """300 against 100 steps at every ratio other than the reference's (the sweep tables compare each axis
    against the reference point only, where the ratio is 0.5): the ``lora.steps`` rows of
    :func:`emloc.sweep_tables.axis_table` over that ratio's points, its 300-step point first, with the ratio in
    a column and in the sentence."""
    frames = []
    for ratio in (r for r in rows["emulator.ratio"].unique() if r != REFERENCE["emulator.ratio"]):
        at_ratio = rows[rows["emulator.ratio"] == ratio]
        first = _matching(at_ratio, {**REFERENCE, "emulator.ratio": ratio})
        if not first.any():
            continue
        table = sweep_tables.axis_table(pd.concat([at_ratio[first], at_ratio[~first]]), axes)
        if len(table):
            table = table[table["axis"] == "lora.steps"].assign(**{"emulator.ratio": ratio})
            frames.append(table.assign(sentence=f"at emulator.ratio={ratio}: " + table["sentence"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


AT_STEPS = 100
"""Ratios and calibration sizes are compared at the standard preset's steps, where every one was measured."""
AXIS_LABELS = {"emulator.ratio": "ratio", "data.n_calibration": "calibration samples"}
"""The axes compared at :data:`AT_STEPS` (one table each), and how a table's columns name them."""
AT_STEPS_FILES = {"emulator.ratio": "ratio.md", "data.n_calibration": "calibration_size.md"}
"""The file each of those tables is written to."""


def axis_at_steps(rows: pd.DataFrame, axes: list[str], axis: str, steps: int = AT_STEPS) -> pd.DataFrame:
    """Every value of ``axis`` against the reference's at ``steps`` (the sweep tables compare each axis against
    the 300-step reference only): the ``axis`` rows of :func:`emloc.sweep_tables.axis_table` over the points at
    ``steps``, the reference value first, with the steps in a column and in the sentence."""
    at_steps = rows[rows["lora.steps"] == steps]
    first = _matching(at_steps, {**REFERENCE, "lora.steps": steps})
    if not first.any():
        return pd.DataFrame()
    table = sweep_tables.axis_table(pd.concat([at_steps[first], at_steps[~first]]), axes)
    if table.empty:
        return table
    table = table[table["axis"] == axis].assign(**{"lora.steps": steps})
    return table.assign(sentence=f"at lora.steps={steps}: " + table["sentence"])


def values_table(tables: dict[str, pd.DataFrame], axes: list[str], axis: str,
                 steps: int = AT_STEPS) -> pd.DataFrame:
    """Each value of ``axis`` at ``steps``, every other axis at the reference (for the docs): its corrected
    transfer, the share of the gap it closes, the correction's effect and its difference to the reference value,
    the last two paired by seed."""
    defaults = {a: REFERENCE[a] for a in axes if a != axis} | {"lora.steps": steps}
    summary, gap = tables["summary"], tables["gap"]
    corrected = summary[_matching(summary, defaults) & (summary["variant"] == "transfer_corrected")]
    closed = gap[_matching(gap, defaults) & (gap["variant"] == "transfer_corrected")].set_index(axis)
    on_off = tables["correction"]
    on_off = on_off[_matching(on_off, defaults)].set_index(axis)
    against = tables["axes"]
    if len(against) and "lora.steps" in against:
        against = against[(against["axis"] == axis) & (against["lora.steps"] == steps)
                          & (against["variant"] == "transfer_corrected") & (against["metric"] == "accuracy")]
        against = {float(row["value"]): _effect(row) for _, row in against.iterrows()}
    else:
        against = {}
    rows = [{axis: f"{row[axis]:g}", "lora.steps": steps, "seeds": int(row["seeds"]),
             "transfer corrected": _cell(row["accuracy"], row["ci_low"], row["ci_high"]),
             "gap closed (corrected)": _share(closed.loc[row[axis]], "gap_closed")
             if row[axis] in closed.index else "",
             "corrected - uncorrected": _effect(on_off.loc[row[axis]], "corrected_minus_uncorrected")
             if row[axis] in on_off.index else "",
             f"minus {AXIS_LABELS[axis]} {REFERENCE[axis]:g}": against.get(float(row[axis]), "")}
            for _, row in corrected.sort_values(axis).iterrows()]
    return pd.DataFrame(rows)


def axis_findings(axes_table: pd.DataFrame) -> list[str]:
    """The one-axis comparisons on accuracy, less the ones that cannot differ (a correction method leaves the
    emulator's own adapter as it is: a zero difference with a zero-width interval)."""
    if axes_table.empty:
        return []
    rows = axes_table[axes_table["metric"] == "accuracy"]
    same = (rows["difference"] == 0) & (rows["ci_low"] == 0) & (rows["ci_high"] == 0)
    return rows.loc[~same, "sentence"].tolist()


def _first(table: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """``table`` with ``columns`` moved to the front, the others in their order."""
    return table[[*columns, *[c for c in table.columns if c not in columns]]]


def _per_task(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One table from per-task tables, the task as its first column."""
    return _first(pd.concat([t.assign(task=task) for task, t in tables.items()], ignore_index=True), "task")


def main() -> None:
    seeds = combined_seeds(SOURCES)
    axes = list(AXES)
    OUT.mkdir(parents=True, exist_ok=True)
    written, methods, calibration = [], {}, {}
    at_steps = {axis: {} for axis in AXIS_LABELS}
    for task, rows in seeds.groupby("task", sort=False):
        task_axes = axes[1:]
        rows = rows.drop(columns="task").reset_index(drop=True)
        tables = sweep_tables.all_tables(rows, task_axes)
        tables["axes"] = pd.concat([tables["axes"], steps_at_other_ratios(rows, task_axes),
                                    *(axis_at_steps(rows, task_axes, axis) for axis in AXIS_LABELS)],
                                   ignore_index=True)
        table = point_table(tables, task_axes).assign(task=task)
        findings = half_gap_findings(tables, task_axes) + axis_findings(tables["axes"])
        written.append((task, tables, table, findings))
        methods[task] = methods_table(tables, task_axes)
        calibration[task] = calibration_table(tables["axes"])
        for axis, per_task in at_steps.items():
            per_task[task] = values_table(tables, task_axes, axis)
    table = _first(pd.concat([t for _, _, t, _ in written], ignore_index=True), "task")
    (OUT / "table.md").write_text(sweep_tables.as_markdown(table), encoding="utf-8")
    table.to_csv(OUT / "table.csv", index=False)
    findings = pd.DataFrame([{"task": task, "finding": f} for task, _, _, fs in written for f in fs])
    (OUT / "findings.md").write_text(findings.to_markdown(index=False) + "\n", encoding="utf-8")
    findings.to_csv(OUT / "findings.csv", index=False)
    (OUT / "correction_methods.md").write_text(sweep_tables.as_markdown(_per_task(methods)), encoding="utf-8")
    (OUT / "calibration.md").write_text(sweep_tables.as_markdown(_per_task(calibration)), encoding="utf-8")
    for axis, name in AT_STEPS_FILES.items():
        compared = {task: table for task, table in at_steps[axis].items() if len(table) > 1}
        if compared:
            (OUT / name).write_text(sweep_tables.as_markdown(_per_task(compared)), encoding="utf-8")
    clamps, clamp_numbers, clamp_said = clamp_tables()
    if len(clamps):
        (OUT / "clamp.md").write_text(sweep_tables.as_markdown(clamps), encoding="utf-8")
        clamp_numbers.to_csv(OUT / "clamp.csv", index=False)
        (OUT / "clamp_findings.md").write_text(clamp_said.to_markdown(index=False) + "\n", encoding="utf-8")
    for name in ("gap", "kept", "loss", "correction", "axes"):
        frame = pd.concat([t[name].assign(task=task) for task, t, _, _ in written if len(t[name])],
                          ignore_index=True)
        frame.to_csv(OUT / f"{name}.csv", index=False)
    seeds.to_csv(OUT / "seeds.csv", index=False)
    used = [name for name in [*SOURCES, *CLAMP_SOURCES.values()] if (RESULTS / name / "seeds.csv").exists()]
    provenance.write(OUT, {"declares": provenance.DERIVED, "from": used,
                           "command": "python benchmarks/schedule_tables.py"})
    print(table.to_markdown(index=False))
    print("\n".join(findings["finding"]))


if __name__ == "__main__":
    main()
