"""Sweeps: a grid of run configs -> one run directory per point -> tables with seed-level intervals.

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
correctness, accuracy and loss; the tables (:mod:`emloc.sweep_tables`) treat each seed as one
observation and pair every comparison by seed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from emloc import io, provenance, sweep_tables
from emloc.config import PRESETS, RunConfig, merge_dicts, nested
from emloc.errors import EmlocError
from emloc.rundir import CORRECTION_SKIPPED, RunDir, fingerprint
from emloc.stages import STAGES, VARIANT_SPECS, evaluated

VARIANT_STAGE = {variant.name: variant.stage for variant in VARIANT_SPECS}
"""The stage whose fingerprint fixes a variant's result (with the evaluation settings)."""
GAP_VARIANTS = sweep_tables.GAP_VARIANTS


@dataclass
class SweepSpec:
    base: dict = field(default_factory=dict)
    grid: dict | list = field(default_factory=dict)
    variants: list = field(default_factory=lambda: list(VARIANT_STAGE))
    n_boot: int = 2000
    """Ignored: the tables use seed-level t intervals since issue 24 (accepted so older grid files load)."""
    confidence: float = 0.95
    """The tables' intervals are 95%: any other value is refused (older grid files state 0.95)."""

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
    if spec.confidence != 0.95:
        raise EmlocError(f"confidence = {spec.confidence!r} in {where}: the sweep tables' intervals are 95%; "
                         "remove the key")
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


def point_overrides(spec: SweepSpec, point: dict) -> dict:
    """The point's settings over the defaults: the grid's ``base`` (with its ``preset``) and the point's
    values."""
    raw = dict(spec.base)
    for key, value in point.items():
        raw = merge_dicts(raw, nested(key, value))
    return raw


def point_config(spec: SweepSpec, point: dict) -> RunConfig:
    raw = point_overrides(spec, point)
    preset = raw.pop("preset", None)
    return RunConfig.from_dict(merge_dicts(PRESETS[preset], raw) if preset else raw)


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
    """What fixes a variant's result: its stage's fingerprint and the evaluation settings. Two variants of
    one stage share it (``emulator_lora`` and ``transfer_uncorrected`` both hang on ``train_emulator``), so
    results are cached per ``(variant, key)``."""
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
        if record["variants"].get(v, {}).get("key") != keys[v] and (v, keys[v]) in cache:
            record["variants"][v] = cache[(v, keys[v])]
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
        cache[(v, keys[v])] = record["variants"][v]
    return record


def run_sweep(spec: SweepSpec, out: str | Path, progress: bool = True,
              on_point: Callable[[int, int, dict], None] | None = None,
              reuse: list | None = None) -> pd.DataFrame:
    """Run (or resume) every point of ``spec`` under ``out``; returns the per-item table.

    ``reuse``: finished run directories (e.g. of ``emloc run``) whose stages are hard-linked into any
    point with the same stage fingerprint instead of being recomputed; where one is another sweep's point, its
    evaluations are reused too (same variant, stage fingerprint and evaluation settings).
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
    for run in donors:  # variants finished by an earlier (interrupted) sweep or a reused sweep's point
        for v, rec in ((run.read_point() or {}).get("variants", {})).items():
            cache.setdefault((v, rec["key"]), rec)
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
    """The sweep's spec and ``(point, variant records)`` of every point with a ``point.json``. An axis value
    of ``None`` (e.g. ``correction.clamp: null``, no clamp) reads ``"none"``: the tables group by it, and a
    missing value would drop out of a group or come back from CSV as NaN."""
    out = Path(out)
    spec = spec_from_dict(io.read_yaml(out / "grid.yaml"))
    paths = [(point, out / "points" / point_name(point) / "point.json") for point in spec.points()]
    return spec, [({axis: NO_VALUE if value is None else value for axis, value in point.items()},
                   io.read_json(path)["variants"]) for point, path in paths if path.exists()]


NO_VALUE = "none"
"""How an axis value of ``None`` reads in a sweep's tables."""


def seeds_table(out: str | Path) -> pd.DataFrame:
    """One row per (point, variant) of every finished point: ``seed``, the axes, ``variant``, ``accuracy``,
    ``loss``, ``items``, ``correct`` (the input of :mod:`emloc.sweep_tables`)."""
    spec, finished = _finished_points(out)
    rows = [{**point, "variant": variant, "accuracy": rec["accuracy"], "loss": rec["loss"],
             "items": len(rec["correct"]), "correct": int(sum(rec["correct"]))}
            for point, variants in finished for variant, rec in variants.items()]
    return pd.DataFrame(rows, columns=["seed", *spec.axes, "variant", "accuracy", "loss", "items", "correct"])


def write_tables(out: str | Path, tables_dir: str | Path | None = None,
                 measured: bool = True) -> dict[str, pd.DataFrame]:
    """Compute the tables of a sweep (:func:`emloc.sweep_tables.all_tables`) from its finished points; write
    CSV, Markdown and the figure (JSON) to ``tables_dir`` (default ``OUT/tables``). ``measured=False`` (tables
    only, no point run): the provenance keeps the commit, date and machine the points were measured with and
    records the recomputation under ``tables_recomputed``."""
    spec = spec_from_dict(io.read_yaml(Path(out) / "grid.yaml"))
    tables = {"items": items_table(out), **sweep_tables.all_tables(seeds_table(out), spec.axes)}
    target = Path(tables_dir) if tables_dir else Path(out) / "tables"
    before = provenance.read(target) if target.is_dir() else None
    write_table_files(tables, spec.axes, target)
    timing_table(out).to_csv(target / "timing.csv", index=False)
    record = sweep_provenance(spec, tables["seeds"]["seed"].unique().tolist())
    if not measured and before is not None:  # where the points were measured: the commit, date, machine
        kept = {key: before[key] for key in ("commit", "date", *provenance.environment()) if key in before}
        record |= kept | {"tables_recomputed": {key: record[key] for key in ("commit", "date")}}
    provenance.write(target, record)
    return tables


def timing_table(out: str | Path) -> pd.DataFrame:
    """Seconds per stage of every point folder, as its manifests recorded them (a stage adopted from another
    point carries that point's time), and their total: what a sweep costs, kept with its tables."""
    rows = []
    for folder in sorted(p for p in (Path(out) / "points").iterdir() if p.is_dir()):
        seconds = RunDir(folder).stage_seconds()
        rows.append({"point": folder.name, **seconds, "total": round(sum(seconds.values()), 2)})
    return pd.DataFrame(rows)


def sweep_provenance(spec: SweepSpec, seeds: list) -> dict:
    """The settings of every point (less the seed, listed once), for :mod:`emloc.provenance`."""
    configs = {}
    for point in spec.points():
        settings = {axis: value for axis, value in point.items() if axis != "seed"}
        configs.setdefault(point_name(settings) or "base", point_overrides(spec, settings))
    return provenance.record(configs, command="emloc sweep", seeds=sorted(int(s) for s in seeds),
                             grid={"base": spec.base, "grid": spec.grid, "variants": spec.variants})


def rewrite_tables(folder: str | Path) -> dict[str, pd.DataFrame]:
    """Recompute the tables of a stored sweep folder from its ``items.csv`` (and ``seeds.csv``, which holds
    the per-seed losses; without it the stored loss table is left as it is), e.g. after a change of the
    statistics."""
    folder = Path(folder)
    items = pd.read_csv(folder / "items.csv")
    seeds = (pd.read_csv(folder / "seeds.csv") if (folder / "seeds.csv").exists()
             else sweep_tables.seeds_from_items(items))
    axes = [c for c in seeds.columns if c not in ("seed", "variant", "accuracy", "loss", "items", "correct")]
    tables = {"items": items, **sweep_tables.all_tables(seeds, axes)}
    if seeds["loss"].isna().all():
        del tables["loss"]  # keep the stored loss table: its per-seed values are not here to recompute it
    write_table_files(tables, axes, folder)
    return tables


def write_table_files(tables: dict[str, pd.DataFrame], axes: list[str], target: Path) -> None:
    """CSV of every table but ``wide``, Markdown of every table but the long ones, the summary figure."""
    for name, table in tables.items():
        if name != "wide":
            with io.atomic_path(target / f"{name}.csv") as tmp:
                table.to_csv(tmp, index=False)
        if name not in ("items", "seeds"):
            with io.atomic_path(target / f"{name}.md") as tmp:
                tmp.write_text(sweep_tables.as_markdown(table), encoding="utf-8")
    with io.atomic_path(target / "summary_figure.json") as tmp:
        sweep_tables.summary_figure(tables["summary"], axes).write_json(str(tmp))
