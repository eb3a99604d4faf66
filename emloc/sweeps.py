"""Sweeps: a grid of run configs -> one run directory per point -> tables with bootstrap intervals.

A grid file (YAML)::

    base: {preset: quick, data: {n_test: 60}}      # RunConfig overrides shared by every point
    grid:                                           # dotted RunConfig keys -> values (all combinations)
      emulator.method: [activation_aware, plain, layer_drop, prune]
      emulator.ratio: [0.5]
      seed: [0, 1, 2]
    variants: [zero_shot, emulator_lora, transfer_uncorrected, transfer_corrected, full_lora]

``grid`` may also be a list of such mappings: the sweep is then the union of their products, in order
(e.g. the methods at ratio 0.5, then the ratios for EMLoC only). A point that does not set an axis of
another sub-grid takes its value from ``base``, so every point has a value on every axis.

Points that share a stage's inputs share its work: a finished stage with the same fingerprint in
another point is hard-linked, not recomputed (e.g. ``train_original`` once per seed), and a variant
already evaluated with the same inputs is reused. Each point keeps ``point.json`` with per-item
correctness, so tables can bootstrap over test items and seeds.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from emloc import io
from emloc.statistics import bootstrap_ci, gap_closed
from emloc.config import PRESETS, RunConfig, merge_dicts, nested
from emloc.errors import EmlocError
from emloc.rundir import CORRECTION_SKIPPED, fingerprint
from emloc.stages import STAGES, VARIANT_SPECS, evaluated

VARIANT_STAGE = {variant.name: variant.stage for variant in VARIANT_SPECS}
"""The stage whose fingerprint fixes a variant's result (with the evaluation settings)."""
GAP_VARIANTS = [variant.name for variant in VARIANT_SPECS if variant.gap]
"""The variants measured by the share of the zero-shot -> LoRA-on-the-original gap they close."""


@dataclass
class SweepSpec:
    base: dict = field(default_factory=dict)
    grid: dict | list = field(default_factory=dict)
    variants: list = field(default_factory=lambda: list(VARIANT_STAGE))
    n_boot: int = 2000
    confidence: float = 0.95

    @property
    def subgrids(self) -> list[dict]:
        return self.grid if isinstance(self.grid, list) else [self.grid]

    @property
    def axes(self) -> list[str]:
        """Grid keys other than the seed (over all sub-grids, first-seen order): the columns a table groups
        by."""
        return list(dict.fromkeys(k for g in self.subgrids for k in g if k != "seed"))

    def points(self) -> list[dict]:
        """Every point with a value on each axis and the seed, without repeats, in sub-grid order."""
        seen, points = set(), []
        for subgrid in self.subgrids:
            for partial in expand_grid(subgrid):
                point = {"seed": partial.get("seed", self.base.get("seed", 0)),
                         **{a: partial[a] if a in partial else _lookup(point_config(self, partial), a)
                            for a in self.axes}}
                if point_name(point) not in seen:
                    seen.add(point_name(point))
                    points.append(point)
        return points


def load_spec(path: str | Path) -> SweepSpec:
    raw = io.read_yaml(path)
    return spec_from_dict(raw, str(path))


def spec_from_dict(raw: dict, where: str = "grid") -> SweepSpec:
    grid = raw.get("grid", {}) if isinstance(raw, dict) else None
    if not isinstance(grid, (dict, list)) or (isinstance(grid, list)
                                              and not all(isinstance(g, dict) for g in grid)):
        raise EmlocError(f"{where} must be a mapping with 'base', 'grid' (a mapping or a list of mappings) "
                         "and optional 'variants': see emloc.sweeps")
    unknown = sorted(set(raw) - {"base", "grid", "variants", "n_boot", "confidence"})
    if unknown:
        raise EmlocError(f"unknown key {unknown[0]!r} in {where}: "
                         "use base, grid, variants, n_boot, confidence")
    spec = SweepSpec(**raw)
    bad = [v for v in spec.variants if v not in VARIANT_STAGE]
    if bad:
        raise EmlocError(f"unknown variant {bad[0]!r} in {where}: choose from {', '.join(VARIANT_STAGE)}")
    for key, values in (item for g in spec.subgrids for item in g.items()):
        if not isinstance(values, list) or not values:
            raise EmlocError(f"grid key {key!r} in {where} needs a non-empty list of values")
    for point in spec.points():
        point_config(spec, point)  # validates every point before any work starts
    return spec


def expand_grid(grid: dict) -> list[dict]:
    """All combinations, seeds outermost so that whole seeds finish first."""
    keys = sorted(grid, key=lambda k: k != "seed")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _lookup(config: RunConfig, dotted: str):
    value = config.to_dict()
    for part in dotted.split("."):
        value = value[part]
    return value


def point_config(spec: SweepSpec, point: dict) -> RunConfig:
    base = dict(spec.base)
    preset = base.pop("preset", None)
    raw = merge_dicts(PRESETS[preset], base) if preset else base
    for key, value in point.items():
        raw = merge_dicts(raw, nested(key, value))
    return RunConfig.from_dict(raw)


def point_name(point: dict) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()).replace("/", "_")


# ---- running ------------------------------------------------------------------------------------

def adopt_finished_stages(run, donors: list) -> list[str]:
    """Hard-link stages that another run finished with the same fingerprint; returns the adopted stages."""
    adopted = []
    for stage in (s.name for s in STAGES if s.linkable):
        if run.is_done(stage):
            continue
        wanted = fingerprint(run.config, stage)
        donor = next((d for d in donors if d.dir != run.dir and d.stage_fingerprint(stage) == wanted), None)
        if donor is not None:
            run.adopt_stage(stage, donor)
            adopted.append(stage)
    return adopted


def variant_key(config: RunConfig, variant: str) -> str:
    return f"{fingerprint(config, VARIANT_STAGE[variant])}:{sorted(config.evaluation.__dict__.items())}"


def run_point(run, spec: SweepSpec, donors: list, cache: dict) -> dict:
    """All stages a point needs (adopting shared ones), then the variants not evaluated before."""
    from emloc import pipeline
    adopt_finished_stages(run, donors)
    # every point trains LoRA on its emulator, plus the stages its variants need
    pipeline.run_stages(run, ["train_emulator", *(VARIANT_STAGE[v] for v in spec.variants)])
    corrects = run.emulator_kind.corrects
    wanted = evaluated(spec.variants, corrects)
    record = run.read_point() or {"variants": {}}
    keys = {v: variant_key(run.config, v) for v in wanted}
    for v in wanted:
        if record["variants"].get(v, {}).get("key") != keys[v] and keys[v] in cache:
            record["variants"][v] = cache[keys[v]]
    missing = [v for v in wanted if record["variants"].get(v, {}).get("key") != keys[v]]
    if missing:
        results = pipeline.evaluate(run, missing)
        for v in missing:
            correct = [run.data.is_correct(p, e) for p, e in zip(results["predictions"][v], run.data.test)]
            record["variants"][v] = {"key": keys[v],
                                     **{k: results["variants"][v][k] for k in ("accuracy", "loss", "n")},
                                     "correct": [int(c) for c in correct]}
    record["notes"] = [] if corrects else [CORRECTION_SKIPPED]
    run.write_point(record)
    for v in wanted:
        cache[keys[v]] = record["variants"][v]
    return record


def run_sweep(spec: SweepSpec, out: str | Path, progress: bool = True,
              on_point: Callable[[int, int, dict], None] | None = None,
              reuse: list | None = None) -> pd.DataFrame:
    """Run (or resume) every point of ``spec`` under ``out``; returns the per-item table.

    ``reuse``: finished run directories (e.g. of ``emloc run``) whose stages are hard-linked into any
    point with the same stage fingerprint instead of being recomputed.
    """
    from emloc import pipeline
    out = Path(out)
    io.write_yaml(out / "grid.yaml", spec.__dict__)
    points = spec.points()
    runs = [pipeline.Run(out / "points" / point_name(p), point_config(spec, p), progress=progress)
            for p in points]
    missing = [d for d in reuse or [] if not (Path(d) / "config.yaml").is_file()]
    if missing:
        raise EmlocError(f"--reuse {missing[0]} is not a run directory (no config.yaml): "
                         "give a finished run's folder")
    donors = runs + [pipeline.Run(d, progress=False) for d in reuse or []]
    cache = {}
    for run in runs:  # variants finished by an earlier (interrupted) sweep
        for v, rec in ((run.read_point() or {}).get("variants", {})).items():
            cache.setdefault(rec["key"], rec)
    for i, (point, run) in enumerate(zip(points, runs)):
        if on_point:
            on_point(i, len(points), point)
        run_point(run, spec, donors, cache)
    return items_table(out)


# ---- tables and figures ---------------------------------------------------------------------------

def items_table(out: str | Path) -> pd.DataFrame:
    """Long table: one row per (point, variant, test item) with the grid values and ``correct``."""
    spec, finished = _finished_points(out)
    frames = [pd.DataFrame({**point, "variant": variant, "item": range(len(rec["correct"])),
                            "correct": rec["correct"]})
              for point, variants in finished for variant, rec in variants.items()]
    if not frames:
        return pd.DataFrame(columns=["seed", *spec.axes, "variant", "item", "correct"])
    return pd.concat(frames, ignore_index=True)


def _finished_points(out: str | Path) -> tuple[SweepSpec, list[tuple[dict, dict]]]:
    """The sweep's spec and ``(point, variant records)`` of every point with a ``point.json``."""
    out = Path(out)
    spec = spec_from_dict(io.read_yaml(out / "grid.yaml"))
    paths = [(point, out / "points" / point_name(point) / "point.json") for point in spec.points()]
    return spec, [(point, io.read_json(path)["variants"]) for point, path in paths if path.exists()]


def _groups(items: pd.DataFrame, variants: list[str]) -> list[np.ndarray]:
    """Per seed, a ``(len(variants), n_items)`` array; seeds lacking a variant are left out."""
    groups = []
    for _, seed_items in items.groupby("seed"):
        wide = seed_items.pivot_table(index="variant", columns="item", values="correct")
        if set(variants) <= set(wide.index):
            groups.append(wide.loc[variants].to_numpy())
    return groups


def _by_point(items: pd.DataFrame, axes: list[str]):
    """``(axis values, rows)`` per point of the per-item table (the whole table when there are no axes)."""
    for key, group in items.groupby(axes, sort=False) if axes else [((), items)]:
        yield dict(zip(axes, key if isinstance(key, tuple) else (key,))), group


def summary_table(items: pd.DataFrame, axes: list[str], n_boot: int = 2000,
                  confidence: float = 0.95) -> pd.DataFrame:
    """Accuracy per (axes, variant): mean over items and seeds, bootstrap interval, counts."""
    rows = []
    for key, group in items.groupby([*axes, "variant"], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        mean, low, high = bootstrap_ci(_groups(group, [key[-1]]), n_boot=n_boot, confidence=confidence)
        rows.append({**dict(zip([*axes, "variant"], key)), "accuracy": mean, "ci_low": low, "ci_high": high,
                     "seeds": group["seed"].nunique(), "items": len(group)})
    return pd.DataFrame(rows)


def gap_table(items: pd.DataFrame, axes: list[str], n_boot: int = 2000,
              confidence: float = 0.95) -> pd.DataFrame:
    """Share of the zero-shot -> LoRA-on-original accuracy gap closed, paired per seed and item."""
    rows = []
    for point, group in _by_point(items, axes):
        for variant in GAP_VARIANTS:
            groups = _groups(group, [variant, "zero_shot", "full_lora"])
            if groups:
                share, low, high = bootstrap_ci(groups, gap_closed, n_boot, confidence)
                rows.append({**point, "variant": variant, "gap_closed": share,
                             "ci_low": low, "ci_high": high, "seeds": len(groups)})
    return pd.DataFrame(rows)


def correction_table(items: pd.DataFrame, axes: list[str], n_boot: int = 2000,
                     confidence: float = 0.95) -> pd.DataFrame:
    """Correction on vs off: ``transfer_corrected - transfer_uncorrected`` accuracy, paired per seed and
    item."""
    rows = []
    for point, group in _by_point(items, axes):
        groups = _groups(group, ["transfer_corrected", "transfer_uncorrected"])
        if groups:
            effect, low, high = bootstrap_ci(groups, lambda means: means[0] - means[1], n_boot, confidence)
            rows.append({**point, "corrected_minus_uncorrected": effect, "ci_low": low, "ci_high": high,
                         "seeds": len(groups), "within_noise": bool(low <= 0 <= high)})
    return pd.DataFrame(rows)


def loss_table(out: str | Path, axes: list[str]) -> pd.DataFrame:
    """Mean response-token loss per (axes, variant) over seeds, and the share of the zero-shot -> LoRA
    loss gap closed, ``(L_zero - L) / (L_zero - L_full)``, from the seed means (no item-level interval:
    only the mean loss per variant is stored)."""
    _, finished = _finished_points(out)
    rows = [{**point, "variant": v, "loss": rec["loss"]}
            for point, variants in finished for v, rec in variants.items()]
    if not rows:
        return pd.DataFrame(columns=[*axes, "variant", "loss", "seeds", "loss_gap_closed"])
    frame = pd.DataFrame(rows)
    keys = [*axes, "variant"]
    table = frame.groupby(keys, sort=False).agg(loss=("loss", "mean"),
                                                seeds=("seed", "nunique")).reset_index()
    reference = table.set_index(keys)["loss"]
    def closed(row):
        base = tuple(row[a] for a in axes)
        zero, full = reference.get((*base, "zero_shot")), reference.get((*base, "full_lora"))
        return ((zero - row["loss"]) / (zero - full) if zero is not None and full is not None and zero != full
                else float("nan"))
    table["loss_gap_closed"] = table.apply(closed, axis=1)
    return table


def wide_table(summary: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per point, one column per variant: ``"accuracy [low, high]"`` (for reading, not computing)."""
    if summary.empty:
        return pd.DataFrame(columns=[*axes, *VARIANT_STAGE])
    cells = summary.assign(cell=[f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in
                                 zip(summary["accuracy"], summary["ci_low"], summary["ci_high"])])
    wide = (cells.pivot(index=axes, columns="variant", values="cell") if axes
            else cells.set_index("variant")[["cell"]].T)
    ordered = [v for v in VARIANT_STAGE if v in wide.columns]
    return wide[ordered].fillna("").reset_index()


def summary_figure(summary: pd.DataFrame, axes: list[str], title: str = "Accuracy (95% bootstrap interval)"):
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


def write_tables(out: str | Path, tables_dir: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Compute the items/summary/gap/correction/loss tables of a sweep; write CSV, Markdown and the figure
    (JSON)."""
    out = Path(out)
    spec = spec_from_dict(io.read_yaml(out / "grid.yaml"))
    target = Path(tables_dir) if tables_dir else out / "tables"
    items = items_table(out)
    tables = {"items": items, "summary": summary_table(items, spec.axes, spec.n_boot, spec.confidence),
              "gap": gap_table(items, spec.axes, spec.n_boot, spec.confidence),
              "correction": correction_table(items, spec.axes, spec.n_boot, spec.confidence),
              "loss": loss_table(out, spec.axes)}
    for name, table in tables.items():
        with io.atomic_path(target / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
    tables["wide"] = wide_table(tables["summary"], spec.axes)
    for name, table in tables.items():
        if name != "items":
            with io.atomic_path(target / f"{name}.md") as tmp:
                tmp.write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n", encoding="utf-8")
    with io.atomic_path(target / "summary_figure.json") as tmp:
        summary_figure(tables["summary"], spec.axes).write_json(str(tmp))
    return tables
