"""When does the LoRA correction help? Train once per (task, ratio, seed), snapshot the adapter at several
step counts, then evaluate every snapshot without correction and with every correction setting (correction
is cheap, training is the cost).

    PYTHONPATH=. python benchmarks/correction_sweep.py --tasks addition wordfacts --ratios 0.5 \
        --steps 50 100 300 --seeds 0 1 2 --n-test 100 --out benchmarks/results/correction
    PYTHONPATH=. python benchmarks/correction_sweep.py --summarize --out benchmarks/results/correction

Training length: the snapshots are taken along one run of ``max(steps)`` steps whose cosine schedule spans
the whole run, so "50 steps" means the first 50 steps of a 300-step run (higher learning rate than a run
that stops at 50), not a separate 50-step run.

Seeds vary the LoRA initialisation and the training-data order; per task the data splits, the test items,
the calibration statistics and the emulator are fixed (seed 0), so settings are compared on the same items.
They come from the pipeline's own ``calibrate`` and ``build`` stages, on one run directory per (task, ratio)
under ``--runs`` (seed 0); training keeps ``train_lora`` with a callback that snapshots the adapter.
Results are appended to ``runs.csv`` (one row per (task, ratio, steps, seed, setting) with the per-item
correctness as a 0/1 string), so an interrupted sweep resumes where it stopped. ``--summarize`` prints and
writes ``summary.md`` from ``runs.csv``: per setting the mean accuracy over seeds (each seed's accuracy over
the test items is one observation) with its 95% Student-t interval over seeds, and the differences to
``uncorrected`` and to ``official_l3`` paired by seed (same test items), each with its verdict ("beats",
"within noise", "worse"); loss likewise where per-seed loss is stored. A point with one seed says so: its
interval is the single value and its differences get no verdict. See ``emloc.statistics``.

    PYTHONPATH=. python benchmarks/correction_sweep.py --summarize --out benchmarks/results/correction_arithmetic
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

SETTINGS = [  # (name, method, lambda); 'uncorrected' and 'emulator_lora' need no correction
    ("official_l3", "official", 3.0), ("official_l1", "official", 1.0), ("official_l10", "official", 10.0),
    ("official_none", "official", None), ("aligned", "aligned", None),
    ("activation_aware_l3", "activation_aware", 3.0), ("activation_aware_none", "activation_aware", None),
]
FIELDS = ["task", "ratio", "steps", "seed", "setting", "accuracy", "loss", "n", "train_seconds", "modules_clamped",
          "update_mismatch_cosine", "update_mismatch_coefficient", "misalignment_after", "correct"]


def done_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    with path.open() as f:
        return {(r["task"], float(r["ratio"]), int(r["steps"]), int(r["seed"]), r["setting"]) for r in csv.DictReader(f)}


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})


class TaskSetup:
    """Per (task, ratio): a pipeline run (seed 0) under ``folder`` whose ``calibrate`` and ``build`` stages give
    the data, the calibration statistics and the emulator factors (reused when already finished there)."""

    def __init__(self, folder: Path, task: str, ratio: float, n_train: int, n_test: int, n_calibration: int,
                 max_new_tokens: int = 8):
        from emloc import pipeline
        from emloc.config import RunConfig
        config = RunConfig.from_dict({
            "model": "default", "device": "cpu", "seed": 0, "emulator": {"ratio": ratio},
            "data": {"task": task, "n_train": n_train, "n_calibration": n_calibration, "n_test": n_test, "max_length": 128},
            "evaluation": {"max_new_tokens": max_new_tokens}})
        self.run = pipeline.Run(folder, config, progress=False)
        self.stats = self.run.stats() if self.run.is_done("calibrate") else pipeline.calibrate(self.run)
        self.factors = self.run.factors() if self.run.is_done("build") else pipeline.build(self.run, self.stats)
        self.data, self.tokenizer = self.run.data, self.run.tokenizer
        self.targets = config.emulator.target_modules
        self.train_features = self.run.features("train")
        self.max_new_tokens = max_new_tokens

    def evaluate(self, model) -> dict:
        """Exact-match accuracy by greedy generation (the response loss is skipped: compute is scarce)."""
        from emloc.evaluation import generate_answers
        model.eval()
        predictions = generate_answers(model, self.tokenizer, self.data, self.data.test, self.max_new_tokens, 32)
        correct = [self.data.is_correct(p, e) for p, e in zip(predictions, self.data.test)]
        return {"accuracy": sum(correct) / len(correct), "loss": float("nan"), "n": len(correct), "correct": correct}


def evaluate_corrections(setup: TaskSetup, adapter_dir: str, key: dict, done: set, out: Path, chosen: list[str]) -> None:
    from emloc.correction import correct_adapter
    from emloc.lora import load_adapter
    by_name = {s[0]: s for s in SETTINGS}
    settings = [("uncorrected", None, None), *(by_name[name] for name in chosen)]
    for name, method, lam in settings:
        if (key["task"], key["ratio"], key["steps"], key["seed"], name) in done:
            continue
        peft_model = load_adapter(setup.run.fresh_model(), adapter_dir)
        extra = {}
        if method is not None:
            report, _ = correct_adapter(peft_model, setup.factors, lam, method=method, stats=setup.stats)
            extra = {"modules_clamped": int((report["clamped_columns"] > 0).sum()),
                     "update_mismatch_cosine": _weighted(report, "update_mismatch_cosine"),
                     "update_mismatch_coefficient": _weighted(report, "update_mismatch_coefficient"),
                     "misalignment_after": float(report["misalignment_after"].mean())}
        result = setup.evaluate(peft_model.merge_and_unload())
        append_row(out, {**key, "setting": name, **_scores(result), **extra})
        print(f"  {name:24s} acc={result['accuracy']:.2f}", flush=True)


def _weighted(report, column: str) -> float:
    """Mean over modules the emulator changed (a module with no mismatch has no coefficient)."""
    changed = report[report["mismatch_norm"] > 0]
    return float(changed[column].mean()) if len(changed) else 0.0


def _scores(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "loss": result["loss"], "n": result["n"],
            "correct": "".join("1" if c else "0" for c in result["correct"])}


class AdapterSnapshots(TrainerCallback):
    """Saves the adapter (a standard peft folder) after each of the given optimizer steps."""

    def __init__(self, steps: list[int], folder: Path):
        self.steps, self.folder, self.seconds, self.start = set(steps), folder, {}, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.seconds[state.global_step] = time.perf_counter() - self.start
            model.save_pretrained(self.folder / f"step{state.global_step}")


def run_sweep(args) -> None:
    from emloc.config import LoraConfigSpec
    from emloc.lora import load_adapter, train_lora
    out = Path(args.out) / "runs.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    setups: dict[tuple, TaskSetup] = {}
    total = max(args.steps)
    # one training run per (task, ratio, seed), evaluated at every snapshot step; tasks outermost so a
    # cut-short sweep still has every seed of the first task
    for task, ratio, seed in itertools.product(args.tasks, args.ratios, args.seeds):
        if (task, ratio) not in setups:
            folder = Path(args.runs) / f"{task}_ratio{ratio}_train{args.n_train}_cal{args.n_calibration}_test{args.n_test}"
            setups[task, ratio] = TaskSetup(folder, task, ratio, args.n_train, args.n_test, args.n_calibration,
                                            args.max_new_tokens)
        setup, done = setups[task, ratio], done_keys(out)
        if (task, ratio, 0, -1, "zero_shot") not in done:
            append_row(out, {"task": task, "ratio": ratio, "steps": 0, "seed": -1, "setting": "zero_shot",
                             **_scores(setup.evaluate(setup.run.fresh_model()))})
        wanted = ["emulator_lora", "uncorrected", *args.settings]
        if all((task, ratio, steps, seed, s) in done for steps in args.steps for s in wanted):
            continue
        print(f"{task} ratio={ratio} seed={seed}: {total} steps, snapshots at {args.steps}", flush=True)
        spec = LoraConfigSpec(steps=total, warmup_steps=max(1, total // 10))
        emulator = setup.run.emulator(setup.factors)
        with tempfile.TemporaryDirectory(prefix="emloc-sweep-") as folder:
            folder = Path(folder)
            snapshots = AdapterSnapshots(args.steps, folder)
            trained = train_lora(emulator, setup.train_features, spec, setup.targets, setup.tokenizer.pad_token_id,
                                 seed=seed, progress=False, callbacks=[snapshots])
            print(f"  trained in {trained.seconds:.0f} s, final loss {trained.history[-1][1]:.3f}", flush=True)
            del trained, emulator
            for steps in args.steps:
                key = {"task": task, "ratio": ratio, "steps": steps, "seed": seed}
                snapshot = str(folder / f"step{steps}")
                if (task, ratio, steps, seed, "emulator_lora") not in done:
                    on_emulator = load_adapter(setup.run.emulator(setup.factors), snapshot)
                    append_row(out, {**key, "setting": "emulator_lora", "train_seconds": round(snapshots.seconds[steps], 1),
                                     **_scores(setup.evaluate(on_emulator))})
                    del on_emulator
                print(f" step {steps}", flush=True)
                evaluate_corrections(setup, snapshot, key, done, out, args.settings)


INTERVAL_NOTE = ("95% intervals: Student-t over seeds (one observation per seed: its accuracy over the task's "
                 "test items); differences paired by seed on the same test items; verdict: \"beats\" / "
                 "\"worse\" when the paired interval excludes 0, else \"within noise\". \"1 seed\": no spread "
                 "to measure, the interval is the single value and a difference gets no verdict.")
REFERENCES = ("uncorrected", "official_l3")
"""Every setting is compared with these two, paired by seed: no correction and the default correction."""


def per_seed(rows, column: str):
    """``column`` per seed (indexed by seed), NaNs dropped; ``accuracy`` is each seed's mean over its items."""
    import numpy as np
    if column == "accuracy":
        values = rows["correct"].map(lambda s: float(np.mean([c == "1" for c in s])))
        return values.set_axis(rows["seed"]).sort_index()
    return rows.set_index("seed")[column].astype(float).dropna().sort_index()


def setting_interval(values, bounds=None) -> dict:
    """Mean over seeds and its 95% Student-t interval (:func:`emloc.statistics.seed_interval`, clipped to
    ``bounds``); one seed: the single value (``seeds == 1``: say so)."""
    from emloc.statistics import seed_interval
    mean, low, high = seed_interval(list(values), bounds=bounds)
    if len(values) == 1:
        low = high = mean
    return {"mean": mean, "low": low, "high": high, "seeds": len(values)}


def paired(values, reference, higher_is_better: bool = True) -> dict | None:
    """``values - reference`` paired by seed (:func:`emloc.statistics.paired_difference`) on the seeds both
    have, with its verdict; ``None`` when they share no seed; one shared seed: no verdict (``"1 seed"``)."""
    from emloc.statistics import paired_difference, verdict
    common = values.index.intersection(reference.index)
    if len(common) == 0:
        return None
    mean, low, high = paired_difference(values.loc[common].to_numpy(), reference.loc[common].to_numpy())
    word = verdict(low, high, higher_is_better) if len(common) > 1 else "1 seed"
    return {"mean": mean, "low": low, "high": high, "seeds": len(common), "verdict": word}


def summary_table(runs):
    """One row per (task, ratio, steps, setting): accuracy over seeds with its interval, the paired
    differences to each of :data:`REFERENCES` (accuracy, and loss where per-seed loss is stored) and the mean
    update/mismatch diagnostics. Numbers only; :func:`summary_markdown` formats them."""
    import pandas as pd
    order = ["zero_shot", "emulator_lora", "uncorrected", *(n for n, _, _ in SETTINGS)]
    has_loss = runs["loss"].notna().any()
    rows = []
    for (task, ratio, steps), group in runs.groupby(["task", "ratio", "steps"], sort=True):
        by_setting = {name: part for name, part in group.groupby("setting")}
        names = [s for s in order if s in by_setting] + sorted(set(by_setting) - set(order))
        metrics = [("accuracy", True)] + ([("loss", False)] if has_loss else [])
        values = {(name, m): per_seed(by_setting[name], m) for name in names for m, _ in metrics}
        for setting in names:
            row = {"task": task, "ratio": ratio, "steps": steps, "setting": setting}
            for metric, higher in metrics:
                own = values[setting, metric]
                row[metric] = setting_interval(own, (0.0, 1.0) if metric == "accuracy" else None) if len(own) else None
                for ref in REFERENCES:
                    compared = (ref in by_setting and setting not in (ref, "zero_shot") and len(own))
                    row[f"{metric}_minus_{ref}"] = (paired(own, values[ref, metric], higher) if compared
                                                    else None)
            corrected = setting.startswith(("official", "aligned", "activation"))
            for column, name in (("update_mismatch_cosine", "cos"), ("update_mismatch_coefficient", "coef")):
                row[name] = by_setting[setting][column].mean() if corrected else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


def _interval_text(cell, signed: bool = False) -> str:
    if cell is None or (isinstance(cell, float) and cell != cell):
        return ""
    f = "{:+.3f}" if signed else "{:.3f}"
    mean = f.format(cell["mean"])
    if cell["seeds"] < 2:
        return f"{mean} (1 seed)"
    return f"{mean} [{f.format(cell['low'])}, {f.format(cell['high'])}]"


def _scientific(value) -> str:
    import math
    return "" if value is None or math.isnan(value) else f"{value:.1e}"


def summary_markdown(table) -> str:
    """The table of :func:`summary_table` as Markdown, the intervals' definition above it."""
    metrics = ["accuracy"] + (["loss"] if "loss" in table.columns else [])
    header = ["task", "ratio", "steps", "setting", "seeds"]
    for metric in metrics:
        header += [f"{metric} (95% CI)"]
        for ref in REFERENCES:
            header += [f"{metric} minus {ref} (95% CI)", f"vs {ref}"]
    header += ["update/mismatch cos", "coef"]
    lines = [INTERVAL_NOTE, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        seeds = row["accuracy"]["seeds"] if row["accuracy"] else 0
        cells = [row["task"], row["ratio"], row["steps"], row["setting"], seeds]
        for metric in metrics:
            cells.append(_interval_text(row[metric]))
            for ref in REFERENCES:
                difference = row[f"{metric}_minus_{ref}"]
                cells += [_interval_text(difference, signed=True), difference["verdict"] if difference else ""]
        cells += [_scientific(row["cos"]), _scientific(row["coef"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def summarize(args) -> str:
    """Write ``summary.md`` from ``runs.csv`` (see :func:`summary_table`) and return it."""
    import pandas as pd
    runs = pd.read_csv(Path(args.out) / "runs.csv", dtype={"correct": str})
    text = summary_markdown(summary_table(runs))
    (Path(args.out) / "summary.md").write_text(text + "\n", encoding="utf-8")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["addition", "wordfacts"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    p.add_argument("--steps", nargs="+", type=int, default=[50, 100, 300],
                   help="snapshot steps along one run of max(steps) steps (cosine schedule over the whole run)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-calibration", type=int, default=64)
    p.add_argument("--settings", nargs="+", default=[n for n, _, _ in SETTINGS], choices=[n for n, _, _ in SETTINGS],
                   help="correction settings to evaluate besides 'uncorrected' and 'emulator_lora'")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/correction")
    p.add_argument("--runs", default="runs/correction_sweep",
                   help="pipeline run folders (calibration statistics, emulator) per (task, ratio), reused on resume")
    p.add_argument("--summarize", action="store_true", help="only print and write the summary table")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if not args.summarize:
        start = time.perf_counter()
        run_sweep(args)
        print(f"sweep finished in {time.perf_counter() - start:.0f} s", flush=True)
    print(summarize(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
