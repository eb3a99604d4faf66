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
import fcntl
from pathlib import Path

import pandas as pd

from emloc import pipeline, sweeps
from emloc.config import PRESETS, RunConfig, merge_dicts
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
                                            # same loss and gradients, about a quarter less time per step
                                            "lora": {"steps": steps, "gradient_checkpointing": False}})
    return RunConfig.from_dict(raw)


def reference_full_lora(sweep: Path, seed: int) -> dict:
    """LoRA on the original at ``seed`` from a stored sweep of the same task and preset (its accuracy on the
    same test items; its loss is the sweep's mean over seeds: only the mean is stored). LoRA on the original
    does not depend on the emulator, so points can share it instead of training it again."""
    items = pd.read_csv(sweep / "items.csv")
    accuracy = items[(items["variant"] == "full_lora") & (items["seed"] == seed)].drop_duplicates("item")["correct"]
    losses = pd.read_csv(sweep / "loss.csv")
    loss = losses.loc[losses["variant"] == "full_lora", "loss"].iloc[0]
    if accuracy.empty:
        raise SystemExit(f"{sweep} has no full_lora items for seed {seed}")
    return {"accuracy": float(accuracy.mean()), "loss": float(loss)}


def measure(run: pipeline.Run, train: bool, donors: list, full_lora: dict | None = None) -> dict:
    """The point's numbers, computing only the stages that are not finished; ``full_lora`` (accuracy, loss)
    replaces training and evaluating LoRA on the original."""
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


NO_ADAPTER = ["kl_all", "kl_response", "top1_agreement", "drift_last", "emulator_accuracy", "emulator_loss"]
"""Measures of the emulator alone: the same whether or not its point also trained LoRA."""


def intervals(points: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, ratio, steps, trained, setting, measure): mean over seeds and its 95% t interval.

    The emulator-alone measures of trained and untrained points are pooled per emulator (task, ratio, seed,
    setting) and reported under ``trained = False``; trained groups carry the adapters' measures."""
    emulators = points.groupby(["task", "ratio", "seed", "setting"], sort=False).first().reset_index()
    adapters = points[points["trained"]].drop(columns=NO_ADAPTER)
    return pd.concat([seed_intervals(emulators.assign(trained=False)[KEYS + NO_ADAPTER]), seed_intervals(adapters)],
                     ignore_index=True)


def seed_intervals(points: pd.DataFrame) -> pd.DataFrame:
    measures = [c for c in points.columns if c not in KEYS and points[c].notna().any()]
    rows = []
    for key, group in points.groupby(GROUP, sort=False):
        for measure in measures:
            values = group[measure].dropna().tolist()
            if values:
                low, high = t_interval(values)
                rows.append(dict(zip(GROUP, key)) | {"measure": measure, "mean": sum(values) / len(values),
                                                    "ci_low": low, "ci_high": high, "seeds": len(values)})
    return pd.DataFrame(rows)


def summarize() -> pd.DataFrame:
    """``intervals.csv`` (tidy) and ``summary.md`` (one row per setting, "mean [low, high]" per measure)."""
    tidy = intervals(pd.read_csv(RESULTS / "points.csv"))
    tidy.to_csv(RESULTS / "intervals.csv", index=False)
    cells = tidy.assign(text=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if n > 1 else f"{m:.3f}"
                              for m, lo, hi, n in zip(tidy["mean"], tidy["ci_low"], tidy["ci_high"], tidy["seeds"])])
    table = cells.pivot_table(index=GROUP, columns="measure", values="text", aggfunc="first", sort=False)
    seeds = tidy.groupby(GROUP, sort=False)["seeds"].max().rename("seeds")
    table = table.join(seeds).reset_index()
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
    parser.add_argument("--full-lora-from", help="a stored sweep of the same task and preset (e.g. "
                        "benchmarks/results/sweep_addition) whose LoRA-on-the-original results replace training it")
    parser.add_argument("--out", default="runs/emulator_fidelity")
    parser.add_argument("--summarize", action="store_true", help="only rewrite summary.md from points.csv")
    args = parser.parse_args(argv)
    if not args.summarize:
        run_points(args)
    print(summarize().to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
