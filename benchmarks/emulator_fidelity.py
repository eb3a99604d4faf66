"""A faithful emulator at the same budget: today's default emulator against the last ``down_proj`` compressed,
sequential calibration, global rank allocation and both, on the real default model (settings: :data:`SETTINGS`).

For each (task, ratio, seed, setting) it builds the emulator and measures, with no adapter, the next-token KL
of the emulator from the original on the held-out prompts, the residual-stream drift after the last layer,
and the emulator's response loss and accuracy. ``--train`` also runs LoRA, the correction and the six
variants (the share of the zero-shot -> full-LoRA gap closed, accuracy and loss). Finished points are kept in
``OUT/points/<name>`` and reused; calibration statistics are shared between settings.

``--summarize`` rewrites ``intervals.csv``, ``no_interval.csv`` and ``summary.md`` from ``points.csv`` (no
model runs). Each seed is one observation (``emloc.statistics``): means over seeds with 95% Student-t
intervals; the share of the gap closed is a ratio of means over seeds, mean(variant - zero_shot) /
mean(full_lora - zero_shot), undefined (with the reason) when the gap's own paired interval is not above zero
or with one seed; corrected minus uncorrected is paired by seed. A full-LoRA loss taken from a sweep that
stores only its mean has no seed interval (nor has the loss gap closed built on it): such rows go to
``no_interval.csv`` with the reason, so every row of ``intervals.csv`` has ``ci_low <= mean <= ci_high``.
It also writes ``trained.md`` (the trained table in brief), ``differences.csv``/``.md``/``differences_trained.md``
(every setting minus ``default``, paired by seed, with its verdict) and ``findings.md`` (their sentences). The
points declare today's defaults with each setting's overrides in the folder's provenance record.

    PYTHONPATH=. python benchmarks/emulator_fidelity.py --tasks addition --seeds 0 1 2 3 4 --settings default \
        sequential --train --full-lora-from benchmarks/results/sweep_addition_5seeds --out benchmarks/out/fidelity
    PYTHONPATH=. python benchmarks/emulator_fidelity.py --summarize
"""
from __future__ import annotations

import argparse
import fcntl
import math
from pathlib import Path

import pandas as pd

from emloc import pipeline, provenance, sweeps
from emloc.config import PRESETS, RunConfig, merge_dicts
from emloc.statistics import comparison_sentence, gap_closed_interval, paired_difference, seed_interval, verdict

SETTINGS = {
    "default": {"calibration": "independent", "allocation": "uniform", "skip_last_down_proj": True},
    "compress_last": {"calibration": "independent", "allocation": "uniform", "skip_last_down_proj": False},
    "sequential": {"calibration": "sequential", "allocation": "uniform", "skip_last_down_proj": True},
    "global": {"calibration": "independent", "allocation": "global", "skip_last_down_proj": True},
    "both": {"calibration": "sequential", "allocation": "global", "skip_last_down_proj": True},
}
"""Emulator options per setting; every setting keeps the same parameter budget (rho). ``default`` is today's
defaults (the last decoder layer's ``down_proj`` left dense, as the official configuration does);
``compress_last`` compresses it too (the default before issue 24)."""
RESULTS = Path("benchmarks/results/emulator_fidelity")


def point_overrides(task: str, ratio: float, setting: str, steps: int) -> dict:
    """The point's settings over today's defaults (the seed apart): what its provenance record names."""
    return {"preset": "standard", "data": {"task": task}, "emulator": {"ratio": ratio, **SETTINGS[setting]},
            # same loss and gradients, about a quarter less time per step
            "lora": {"steps": steps, "gradient_checkpointing": False}}


def point_config(task: str, ratio: float, seed: int, setting: str, steps: int) -> RunConfig:
    overrides = point_overrides(task, ratio, setting, steps)
    return RunConfig.from_dict(merge_dicts(PRESETS[overrides.pop("preset")], {"seed": seed, **overrides}))


def record_provenance(args) -> None:
    """Declare the points as measured under today's defaults with each setting's overrides, adding to the
    configurations another run of this script recorded (several runs may share the results folder)."""
    configs = {f"{task}, ratio {ratio}, {setting}, {args.steps} steps":
               point_overrides(task, ratio, setting, args.steps)
               for task in args.tasks for ratio in args.ratios for setting in args.settings}
    with open(RESULTS / ".points.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        earlier = provenance.read(RESULTS) or {}
        if earlier.get("declares") == provenance.CURRENT:
            configs = {label: c["overrides"] for label, c in earlier["configs"].items()} | configs
        command = "PYTHONPATH=. python benchmarks/emulator_fidelity.py (see summary.md for the runs)"
        provenance.write(RESULTS, provenance.record(configs, command=command))


PER_SEED, SWEEP_MEAN = "per seed", "sweep mean, no per-seed value"
"""Where a point's full-LoRA loss comes from (``full_lora_loss_source`` in ``points.csv``): its own seed, or a
stored sweep that keeps only the mean over its seeds (then it gets no seed interval)."""


def reference_full_lora(sweep: Path, seed: int) -> dict:
    """LoRA on the original at ``seed`` from a stored sweep of the same task and preset: its accuracy on the
    same test items, and its loss at that seed when the sweep stores per-seed losses (``seeds.csv``, or a
    ``loss.csv`` with a ``seed`` column), else the sweep's mean over its seeds, marked ``loss_source =
    SWEEP_MEAN``. LoRA on the original does not depend on the emulator, so points can share it instead of
    training it again."""
    items = pd.read_csv(sweep / "items.csv")
    accuracy = items[(items["variant"] == "full_lora") & (items["seed"] == seed)].drop_duplicates("item")["correct"]
    if accuracy.empty:
        raise SystemExit(f"{sweep} has no full_lora items for seed {seed}")
    loss, source = full_lora_loss(sweep, seed)
    return {"accuracy": float(accuracy.mean()), "loss": loss, "loss_source": source}


def full_lora_loss(sweep: Path, seed: int) -> tuple[float, str]:
    """``(loss, source)``: the full-LoRA loss at ``seed`` when the sweep has per-seed values, else its mean."""
    for name in ("seeds.csv", "loss.csv"):
        path = sweep / name
        table = pd.read_csv(path) if path.exists() else pd.DataFrame()
        if {"seed", "variant", "loss"} <= set(table.columns):
            losses = table.loc[(table["variant"] == "full_lora") & (table["seed"] == seed), "loss"].dropna()
            if not losses.empty:
                return float(losses.iloc[0]), PER_SEED
    losses = pd.read_csv(sweep / "loss.csv")
    return float(losses.loc[losses["variant"] == "full_lora", "loss"].iloc[0]), SWEEP_MEAN


def measure(run: pipeline.Run, train: bool, donors: list, full_lora: dict | None = None) -> dict:
    """The point's numbers, computing only the stages that are not finished; ``full_lora`` (accuracy, loss,
    loss_source) replaces training and evaluating LoRA on the original. The per-row ``*_gap_closed`` columns
    are this seed's shares; summaries use the ratio of means over seeds instead (:func:`seed_intervals`)."""
    sweeps.adopt_finished_stages(run, donors)
    trained = ["train_emulator", "correct"] + ([] if full_lora else ["train_original"])
    pipeline.run_stages(run, ["calibrate", "build", "fidelity"] + (trained if train else []))
    # the zero-shot model does not depend on the emulator: trained points evaluate it for their gaps
    variants = ["emulator"]
    if train:
        variants += ["zero_shot", "emulator_lora", "transfer_uncorrected", "transfer_corrected"] + \
            ([] if full_lora else ["full_lora"])
    stored = run.results()["variants"] if run.is_done("evaluate") else {}
    results = stored if set(variants) <= set(stored) else pipeline.evaluate(run, variants)["variants"]
    fidelity = run.fidelity()
    row = {"kl_all": fidelity["kl"]["all"]["mean"], "kl_response": fidelity["kl"]["response"]["mean"],
           "top1_agreement": fidelity["kl"]["all"]["top1_agreement"],
           "drift_last": fidelity["drift"][-1]["relative_error"]}
    v = {name: results[name] for name in variants} | ({"full_lora": full_lora} if full_lora else {})
    for variant, numbers in v.items():
        row[f"{variant}_accuracy"], row[f"{variant}_loss"] = numbers["accuracy"], numbers["loss"]
    if train:
        row["full_lora_loss_source"] = full_lora.get("loss_source", PER_SEED) if full_lora else PER_SEED
        acc_gap = v["full_lora"]["accuracy"] - v["zero_shot"]["accuracy"]
        loss_gap = v["zero_shot"]["loss"] - v["full_lora"]["loss"]
        for name in ("emulator_lora", "transfer_uncorrected", "transfer_corrected"):
            row[f"{name}_gap_closed"] = (v[name]["accuracy"] - v["zero_shot"]["accuracy"]) / acc_gap if acc_gap else None
            row[f"{name}_loss_gap_closed"] = (v["zero_shot"]["loss"] - v[name]["loss"]) / loss_gap if loss_gap else None
    return row


KEYS = ["task", "ratio", "seed", "setting", "steps", "trained"]
GROUP = ["task", "ratio", "steps", "trained", "setting"]
"""A point is KEYS; the seeds of one GROUP are summarised together."""


def record(row: dict) -> None:
    """Add ``row`` to ``points.csv`` (replacing the same point), under a lock: several runs may share the file."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows_path = RESULTS / "points.csv"
    with open(RESULTS / ".points.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = pd.read_csv(rows_path) if rows_path.exists() else pd.DataFrame(columns=KEYS)
        same = (done[KEYS] == pd.Series({k: row[k] for k in KEYS})).all(axis=1)
        pd.concat([done[~same], pd.DataFrame([row])], ignore_index=True).to_csv(rows_path, index=False)


def run_points(args) -> None:
    out = Path(args.out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record_provenance(args)
    donors: list = []
    for task in args.tasks:
        for ratio in args.ratios:
            for seed in args.seeds:
                for setting in args.settings:
                    name = f"{task}_r{ratio}_s{seed}_{setting}_{args.steps}steps"
                    run = pipeline.Run(out / "points" / name, point_config(task, ratio, seed, setting, args.steps))
                    donors.append(run)
                    print(f"{name} ...", flush=True)
                    reference = reference_full_lora(Path(args.full_lora_from), seed) if args.full_lora_from else None
                    row = {"task": task, "ratio": ratio, "seed": seed, "setting": setting, "steps": args.steps,
                           "trained": args.train, **measure(run, args.train, donors, reference)}
                    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                    record(row)


SHARES = (0.0, 1.0)
BOUNDED = {"top1_agreement", "emulator_accuracy", "zero_shot_accuracy", "emulator_lora_accuracy",
           "transfer_uncorrected_accuracy", "transfer_corrected_accuracy", "full_lora_accuracy"}
"""Measures that are shares: their intervals are clipped to [0, 1] (:func:`seed_interval`'s ``bounds``)."""
NO_ADAPTER = ["kl_all", "kl_response", "top1_agreement", "drift_last", "emulator_accuracy", "emulator_loss"]
"""Measures of the emulator alone: the same whether or not its point also trained LoRA."""


GAP_VARIANTS = ["emulator_lora", "transfer_uncorrected", "transfer_corrected"]
"""The variants measured by the share of the zero-shot -> full-LoRA gap they close."""
COLUMNS = [*GROUP, "measure", "mean", "ci_low", "ci_high", "seeds", "defined", "reason", "verdict"]
INTERVAL_NOTE = ("95% intervals: Student-t over seeds (one observation per seed); differences paired by seed on "
                 "the same test items, with their verdict; gap closed: ratio of means over seeds, "
                 "mean(variant - zero_shot) / mean(full_lora - zero_shot) (for loss: zero_shot - variant over "
                 "zero_shot - full_lora), with its linearised t interval, undefined when the gap's own paired "
                 "interval is not above zero. \"1 seed\": the interval is the single value.")
ONE_SEED = "1 seed: the interval is the single value"


def full_lora_loss_per_seed(points: pd.DataFrame) -> pd.Series:
    """Whether each point's ``full_lora_loss`` is its own seed's (``full_lora_loss_source``). Points recorded
    before that column existed took LoRA on the original from a stored sweep's mean (``--full-lora-from``):
    a full-LoRA loss repeated exactly on several seeds of a task is that mean, not a per-seed value."""
    nothing = pd.Series(index=points.index, dtype=object)
    source = points.get("full_lora_loss_source", nothing)
    per_seed = source.eq(PER_SEED)
    legacy = source.isna() & points.get("full_lora_loss", nothing).notna()
    for _, rows in points[legacy].groupby("task"):
        repeated = rows.groupby("full_lora_loss")["seed"].transform("nunique") > 1
        per_seed[rows.index] = ~repeated
    return per_seed


def intervals(points: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, ratio, steps, trained, setting, measure): mean over seeds and its 95% t interval
    (``defined``; ``reason`` says why not, or "1 seed"); see :func:`seed_intervals`.

    The emulator-alone measures of trained and untrained points are pooled per emulator (task, ratio, seed,
    setting) and reported under ``trained = False``; trained groups carry the adapters' measures."""
    points = points.assign(full_lora_loss_per_seed=full_lora_loss_per_seed(points))
    emulators = points.groupby(["task", "ratio", "seed", "setting"], sort=False).first().reset_index()
    adapters = points[points["trained"]].drop(columns=NO_ADAPTER)
    parts = [seed_intervals(emulators.assign(trained=False)[KEYS + NO_ADAPTER]), seed_intervals(adapters)]
    tidy = pd.concat([p for p in parts if not p.empty], ignore_index=True).reindex(columns=COLUMNS)
    order = {setting: k for k, setting in enumerate(SETTINGS)}  # today's defaults first, then as listed
    ordered = tidy.assign(order=tidy["setting"].map(order)).sort_values(["task", "ratio", "trained", "order"],
                                                                          kind="stable")
    return ordered.drop(columns="order").reset_index(drop=True)


def _row(key: dict, measure: str, mean: float, low: float, high: float, seeds: int, defined: bool,
         reason: str = "", word: str = "") -> dict:
    defined = defined and math.isfinite(low) and math.isfinite(high)
    return key | {"measure": measure, "mean": mean, "ci_low": low, "ci_high": high, "seeds": seeds,
                  "defined": defined, "reason": reason or (ONE_SEED if defined and seeds == 1 else ""),
                  "verdict": word}


def seed_intervals(points: pd.DataFrame) -> pd.DataFrame:
    """Per group of seeds (:data:`GROUP`): every stored measure's mean with :func:`seed_interval`; the full-LoRA
    loss without an interval when it is a sweep's mean (no per-seed value); the share of the gap closed per
    variant as a ratio of means (:func:`gap_closed_interval`, accuracy and loss); and transfer_corrected minus
    transfer_uncorrected paired by seed (:func:`paired_difference`, with its :func:`verdict`)."""
    skip = set(KEYS) | {"full_lora_loss_source", "full_lora_loss_per_seed"}
    measures = [c for c in points.columns
                if c not in skip and not c.endswith("gap_closed") and points[c].notna().any()]
    rows = []
    for key, group in points.groupby(GROUP, sort=False):
        key = dict(zip(GROUP, key))
        sweep_mean = ("full_lora_loss_per_seed" in group and group["full_lora_loss"].notna().any()
                      and not group.loc[group["full_lora_loss"].notna(), "full_lora_loss_per_seed"].all())
        for measure in measures:
            values = group[measure].dropna().astype(float).tolist()
            if not values:
                continue
            if measure == "full_lora_loss" and sweep_mean:
                rows.append(_row(key, measure, sum(values) / len(values), math.nan, math.nan, len(values), False,
                                 f"{SWEEP_MEAN}: no seed interval"))
                continue
            mean, low, high = seed_interval(values, bounds=SHARES if measure in BOUNDED else None)
            rows.append(_row(key, measure, mean, low, high, len(values), True))
        rows += _gap_rows(key, group, sweep_mean)
        rows += _difference_rows(key, group)
    return pd.DataFrame(rows, columns=COLUMNS)


def _gap_rows(key: dict, group: pd.DataFrame, sweep_mean: bool) -> list[dict]:
    rows = []
    for variant in GAP_VARIANTS:
        for metric, sign, suffix in (("accuracy", 1.0, "_gap_closed"), ("loss", -1.0, "_loss_gap_closed")):
            columns = [f"{v}_{metric}" for v in (variant, "zero_shot", "full_lora")]
            if not set(columns) <= set(group.columns):
                continue
            values = group[columns].dropna().astype(float)
            if values.empty:
                continue
            closed = gap_closed_interval(*(sign * values[c].to_numpy() for c in columns))
            low, high, defined, reason = closed["low"], closed["high"], closed["defined"], closed["reason"]
            if metric == "loss" and sweep_mean and defined:
                low, high, defined = math.nan, math.nan, False
                reason = f"estimate only: the full-LoRA loss is the {SWEEP_MEAN}, no seed interval"
            rows.append(_row(key, variant + suffix, closed["estimate"], low, high, len(values), defined, reason))
    return rows


def _difference_rows(key: dict, group: pd.DataFrame) -> list[dict]:
    rows = []
    for metric, higher in (("accuracy", True), ("loss", False)):
        columns = [f"transfer_corrected_{metric}", f"transfer_uncorrected_{metric}"]
        if not set(columns) <= set(group.columns):
            continue
        values = group[columns].dropna().astype(float)
        if values.empty:
            continue
        mean, low, high = paired_difference(values[columns[0]].to_numpy(), values[columns[1]].to_numpy())
        measure = f"corrected_minus_uncorrected_{metric}"
        if len(values) < 2:  # one difference says nothing about noise: no interval, no verdict
            rows.append(_row(key, measure, mean, math.nan, math.nan, 1, False,
                             "1 seed: a single difference has no interval and no verdict"))
        else:
            rows.append(_row(key, measure, mean, low, high, len(values), True, word=verdict(low, high, higher)))
    return rows


REFERENCE = "default"
"""Every other setting is compared with today's defaults, paired by seed."""
LOWER_IS_BETTER = {"kl_all", "kl_response", "drift_last", "emulator_loss", "emulator_lora_loss",
                   "transfer_uncorrected_loss", "transfer_corrected_loss"}
COMPARED = {False: ["kl_all", "kl_response", "top1_agreement", "drift_last", "emulator_loss"],
            True: ["emulator_lora_accuracy", "transfer_uncorrected_accuracy", "transfer_corrected_accuracy",
                   "emulator_lora_loss", "transfer_corrected_loss"]}
"""The measures compared between settings: of the emulator alone, and after LoRA."""
DIFFERENCE_COLUMNS = ["task", "ratio", "steps", "trained", "setting", "measure", "mean", "ci_low", "ci_high",
                      "seeds", "higher_is_better", "verdict", "sentence"]


def setting_differences(points: pd.DataFrame) -> pd.DataFrame:
    """Each setting minus :data:`REFERENCE` on the seeds both have, paired by seed (:func:`paired_difference`),
    with its :func:`verdict` and the sentence the docs quote (:func:`comparison_sentence`); emulator-alone
    measures pooled per emulator as in :func:`intervals`."""
    emulators = points.groupby(["task", "ratio", "seed", "setting"], sort=False).first().reset_index()
    parts = {False: emulators.assign(trained=False), True: points[points["trained"].astype(bool)]}
    rows = []
    for trained, table in parts.items():
        for key, group in table.groupby(["task", "ratio", "steps"], sort=False):
            reference = group[group["setting"] == REFERENCE].set_index("seed")
            others = [s for s in group["setting"].unique() if s != REFERENCE]
            for setting in sorted(others, key=list(SETTINGS).index):
                other = group[group["setting"] == setting].set_index("seed")
                seeds = sorted(set(reference.index) & set(other.index))
                for measure in (m for m in COMPARED[trained] if m in group and other[m].notna().any()):
                    rows.append(_difference(dict(zip(["task", "ratio", "steps"], key)), trained, setting, measure,
                                            other.loc[seeds, measure], reference.loc[seeds, measure]))
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def _difference(key: dict, trained: bool, setting: str, measure: str, values, reference) -> dict:
    higher = measure not in LOWER_IS_BETTER
    mean, low, high = paired_difference(values.to_numpy(float), reference.to_numpy(float))
    sentence = comparison_sentence(setting, REFERENCE, (mean, low, high), measure.replace("_", " "), higher,
                                   seeds=len(values)) if len(values) > 1 else \
        f"{setting} minus {REFERENCE} on {measure.replace('_', ' ')}: {mean:+.3f} (1 seed: no interval, no verdict)"
    return key | {"trained": trained, "setting": setting, "measure": measure, "mean": mean, "ci_low": low,
                  "ci_high": high, "seeds": len(values), "higher_is_better": higher,
                  "verdict": verdict(low, high, higher),
                  "sentence": f"{key['task']}, ratio {key['ratio']}: {sentence}"}


def difference_table(differences: pd.DataFrame, trained: bool) -> pd.DataFrame:
    """One row per (task, setting): "mean [low, high] verdict" of setting minus default per measure."""
    rows = differences[differences["trained"] == trained]
    text = [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] {v}" if n > 1 else f"{m:+.3f} (1 seed, no interval)"
            for m, lo, hi, v, n in zip(rows["mean"], rows["ci_low"], rows["ci_high"], rows["verdict"], rows["seeds"])]
    table = rows.assign(text=text).pivot_table(index=["task", "ratio", "steps", "setting"], columns="measure",
                                               values="text", aggfunc="first", sort=False)
    seeds = rows.groupby(["task", "ratio", "steps", "setting"], sort=False)["seeds"].max()
    return table[[m for m in COMPARED[trained] if m in table]].join(seeds).reset_index()


def _cell(row) -> str:
    if not row["defined"]:
        if math.isnan(row["mean"]):
            return "undefined"
        return f"{row['mean']:.3f} ({'1 seed, ' if row['seeds'] == 1 else ''}no interval)"
    text = f"{row['mean']:.3f} (1 seed)" if row["seeds"] == 1 else \
        f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    return f"{text} {row['verdict']}" if row["verdict"] and row["seeds"] > 1 else text


def summarize() -> pd.DataFrame:
    """``intervals.csv`` (tidy: the measures whose interval is defined, ``ci_low <= mean <= ci_high``),
    ``no_interval.csv`` (the others, with the reason) and ``summary.md`` (per setting "mean [low, high]" per
    measure, no-adapter and trained tables apart, then the reasons)."""
    tidy = intervals(pd.read_csv(RESULTS / "points.csv"))
    defined = tidy["defined"].astype(bool)
    tidy[defined].to_csv(RESULTS / "intervals.csv", index=False)
    tidy[~defined].to_csv(RESULTS / "no_interval.csv", index=False)
    cells = tidy.assign(text=[_cell(row) for row in tidy.to_dict("records")])
    parts, tables = [INTERVAL_NOTE], []
    for trained, title in ((False, "Emulator alone (no adapter)"), (True, "After LoRA (trained points)")):
        rows = cells[cells["trained"] == trained]
        if rows.empty:
            continue
        table = rows.pivot_table(index=GROUP, columns="measure", values="text", aggfunc="first", sort=False)
        seeds = rows.groupby(GROUP, sort=False)["seeds"].max().rename("seeds")
        table = table[[m for m in rows["measure"].unique()]].join(seeds).reset_index().fillna("")
        tables.append(table)
        parts += [f"## {title}", table.to_markdown(index=False)]
    notes = tidy[~defined | (tidy["reason"].ne("") & tidy["reason"].ne(ONE_SEED))]
    if not notes.empty:
        parts += ["## Without an interval", "\n".join(
            f"- {r['task']}, ratio {r['ratio']}, {r['steps']} steps, {'trained' if r['trained'] else 'no adapter'}, "
            f"{r['setting']}, {r['measure']}: {r['reason']}" for r in notes.to_dict("records"))]
    (RESULTS / "summary.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    if len(tables) > 1:  # the docs render a file's first table: the trained one, in brief, gets its own file
        brief = tables[1][[c for c in TRAINED_BRIEF if c in tables[1]]]
        (RESULTS / "trained.md").write_text(brief.to_markdown(index=False) + "\n", encoding="utf-8")
    write_differences(setting_differences(pd.read_csv(RESULTS / "points.csv")))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


TRAINED_BRIEF = ["task", "ratio", "steps", "setting", "seeds", "emulator_lora_accuracy",
                 "transfer_uncorrected_accuracy", "transfer_corrected_accuracy", "full_lora_accuracy",
                 "transfer_corrected_gap_closed", "transfer_corrected_loss_gap_closed",
                 "corrected_minus_uncorrected_accuracy"]
"""The columns of ``trained.md``, the docs' short form of the trained table (``summary.md`` has them all)."""
DIFFERENCE_NOTE = (f"Each setting minus `{REFERENCE}` (today's defaults), paired by seed on the same test items: "
                   "mean [95% Student-t interval] and its verdict (for KL, drift and loss lower is better).")


def write_differences(differences: pd.DataFrame) -> None:
    """``differences.csv`` (tidy, with the sentences), ``differences.md`` (emulator alone, then after LoRA),
    ``differences_trained.md`` (after LoRA alone, for the docs) and ``findings.md`` (the sentences, a table)."""
    differences.to_csv(RESULTS / "differences.csv", index=False)
    parts = [f"## {title}\n\n" + difference_table(differences, trained).to_markdown(index=False)
             for trained, title in ((False, "Emulator alone (no adapter)"), (True, "After LoRA"))
             if (differences["trained"] == trained).any()]
    (RESULTS / "differences.md").write_text("\n\n".join(parts + [DIFFERENCE_NOTE]) + "\n", encoding="utf-8")
    if (differences["trained"] == True).any():  # noqa: E712 (a column of bools); the docs render first tables
        (RESULTS / "differences_trained.md").write_text(
            difference_table(differences, True).to_markdown(index=False) + "\n", encoding="utf-8")
    stage = [f"after {steps} LoRA steps" if trained else "emulator alone"
             for trained, steps in zip(differences["trained"], differences["steps"])]
    findings = pd.DataFrame({"measured on": stage, "finding": differences["sentence"]})
    (RESULTS / "findings.md").write_text(findings.to_markdown(index=False) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["addition"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train", action="store_true", help="also LoRA, the correction and the six variants")
    parser.add_argument("--full-lora-from", help="a stored sweep of the same task and preset (e.g. "
                        "benchmarks/results/sweep_addition) whose LoRA-on-the-original results replace training it")
    parser.add_argument("--out", default="runs/emulator_fidelity")
    parser.add_argument("--summarize", action="store_true",
                        help="only rewrite intervals.csv, no_interval.csv and summary.md from points.csv")
    args = parser.parse_args(argv)
    if not args.summarize:
        run_points(args)
    summarize()
    print((RESULTS / "summary.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
