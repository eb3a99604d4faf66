"""A faithful emulator at the same budget: today's emulator vs the official exclusion, sequential calibration,
global rank allocation and both, on the real default model.

For each (task, ratio, seed, setting) it builds the emulator and measures, with no adapter, the next-token KL
of the emulator from the original on the held-out prompts, the residual-stream drift after the last layer,
and the emulator's response loss and accuracy. ``--train`` also runs LoRA, the correction and the six
variants (the share of the zero-shot -> full-LoRA gap closed, accuracy and loss). Finished points are kept in
``OUT/points/<name>`` and reused; calibration statistics are shared between settings.

    PYTHONPATH=. python benchmarks/emulator_fidelity.py --tasks addition --ratios 0.5 --seeds 0 1 2
    PYTHONPATH=. python benchmarks/emulator_fidelity.py --summarize
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from emloc import pipeline, sweeps
from emloc.config import PRESETS, RunConfig, merge_dicts
from emloc.stages import STAGE
from emloc.statistics import t_interval

SETTINGS = {
    "today": {"calibration": "independent", "allocation": "uniform", "skip_last_down_proj": False},
    "official_skip": {"calibration": "independent", "allocation": "uniform", "skip_last_down_proj": True},
    "sequential": {"calibration": "sequential", "allocation": "uniform", "skip_last_down_proj": True},
    "global": {"calibration": "independent", "allocation": "global", "skip_last_down_proj": True},
    "both": {"calibration": "sequential", "allocation": "global", "skip_last_down_proj": True},
}
"""Emulator options per setting; every setting keeps the same parameter budget (rho)."""
RESULTS = Path("benchmarks/results/emulator_fidelity")


def point_config(task: str, ratio: float, seed: int, setting: str, steps: int) -> RunConfig:
    raw = merge_dicts(PRESETS["standard"], {"seed": seed, "data": {"task": task},
                                            "emulator": {"ratio": ratio, **SETTINGS[setting]},
                                            "lora": {"steps": steps}})
    return RunConfig.from_dict(raw)


def measure(run: pipeline.Run, train: bool, donors: list) -> dict:
    """The point's numbers, computing only the stages that are not finished."""
    sweeps.adopt_finished_stages(run, donors)
    stages = ["calibrate", "build", "fidelity"] + (["train_emulator", "train_original", "correct"] if train else [])
    for name in stages:
        if not run.is_done(name):
            STAGE[name].run(run)
    variants = None if train else ["zero_shot", "emulator"]
    results = run.results() if run.is_done("evaluate") and (not train or "full_lora" in run.results()["variants"]) \
        else pipeline.evaluate(run, variants)
    fidelity = run.fidelity()
    row = {"kl_all": fidelity["kl"]["all"]["mean"], "kl_response": fidelity["kl"]["response"]["mean"],
           "top1_agreement": fidelity["kl"]["all"]["top1_agreement"],
           "drift_last": fidelity["drift"][-1]["relative_error"]}
    for variant, numbers in results["variants"].items():
        row[f"{variant}_accuracy"], row[f"{variant}_loss"] = numbers["accuracy"], numbers["loss"]
    if train:
        v = results["variants"]
        for name in ("emulator_lora", "transfer_uncorrected", "transfer_corrected"):
            acc_gap = v["full_lora"]["accuracy"] - v["zero_shot"]["accuracy"]
            loss_gap = v["zero_shot"]["loss"] - v["full_lora"]["loss"]
            row[f"{name}_gap_closed"] = (v[name]["accuracy"] - v["zero_shot"]["accuracy"]) / acc_gap if acc_gap else None
            row[f"{name}_loss_gap_closed"] = (v["zero_shot"]["loss"] - v[name]["loss"]) / loss_gap if loss_gap else None
    return row


def run_points(args) -> None:
    out = Path(args.out)
    rows_path = RESULTS / "points.csv"
    done = pd.read_csv(rows_path) if rows_path.exists() else pd.DataFrame()
    donors: list = []
    for task in args.tasks:
        for ratio in args.ratios:
            for seed in args.seeds:
                for setting in args.settings:
                    name = f"{task}_r{ratio}_s{seed}_{setting}_{args.steps}steps"
                    run = pipeline.Run(out / "points" / name, point_config(task, ratio, seed, setting, args.steps))
                    donors.append(run)
                    print(f"{name} ...", flush=True)
                    row = {"task": task, "ratio": ratio, "seed": seed, "setting": setting, "steps": args.steps,
                           "trained": args.train, **measure(run, args.train, donors)}
                    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                    if not done.empty:
                        done = done[(done["task"] != task) | (done["ratio"] != ratio) | (done["seed"] != seed)
                                    | (done["setting"] != setting) | (done["steps"] != args.steps)
                                    | (done["trained"] != args.train)]
                    done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
                    RESULTS.mkdir(parents=True, exist_ok=True)
                    done.to_csv(rows_path, index=False)


def summarize() -> pd.DataFrame:
    """Mean and 95% t interval over seeds per (task, ratio, steps, trained, setting)."""
    points = pd.read_csv(RESULTS / "points.csv")
    keys = ["task", "ratio", "steps", "trained", "setting"]
    measures = [c for c in points.columns if c not in keys + ["seed"] and points[c].notna().any()]
    rows = []
    for key, group in points.groupby(keys, sort=False):
        row = dict(zip(keys, key)) | {"seeds": group["seed"].nunique()}
        for column in measures:
            values = group[column].dropna().tolist()
            if values:
                low, high = t_interval(values)
                row[column] = f"{sum(values) / len(values):.3f} [{low:.3f}, {high:.3f}]" if len(values) > 1 \
                    else f"{values[0]:.3f}"
        rows.append(row)
    table = pd.DataFrame(rows)
    (RESULTS / "summary.md").write_text(table.to_markdown(index=False) + "\n", encoding="utf-8")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["addition"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train", action="store_true", help="also LoRA, the correction and the six variants")
    parser.add_argument("--out", default="runs/emulator_fidelity")
    parser.add_argument("--summarize", action="store_true", help="only rewrite summary.md from points.csv")
    args = parser.parse_args(argv)
    if not args.summarize:
        run_points(args)
    print(summarize().to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
