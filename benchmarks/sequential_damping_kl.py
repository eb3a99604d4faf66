"""Issue 24, item 2: the next-token KL of the damped sequential build with the exact truncation.

Since issue 24 the damped sequential build (``emulator.calibration: sequential``, ``sequential_damping``
0.01 by default) truncates the ridge solution ``W_ls`` under ``C~ + delta I``, so each ``W'`` is the exact
minimiser of ``||W X - W' X~||_F^2 + delta ||W' - W||_F^2`` (docs/sequential.md); before, it truncated under
``C~``. For each seed this builds the default model's emulator (the standard preset, task addition, rho 0.5)
with ``calibration: independent`` and ``calibration: sequential`` (default damping) through the pipeline's own
stages (calibrate -> build -> fidelity, both calibrations share the calibrate stage) and reads the next-token
``KL(p_original || p_emulator)`` on the held-out prompts from ``fidelity.json``
(:func:`emloc.fidelity.fidelity_report`), the same number ``benchmarks/emulator_fidelity.py`` reports as
``kl_all``. The library has no switch for the previous (inexact) truncation, so it is not rebuilt here: the
summary quotes the stored ``benchmarks/results/emulator_fidelity_3seeds/points.csv`` numbers of the same points,
measured before the fix, for comparison.

Writes ``kl.csv`` (one row per seed and calibration, rewritten after every point) and ``summary.md`` (mean
and seed-level Student-t 95% interval, :func:`emloc.statistics.seed_interval`; settings, date, CPU, torch).

    PYTHONPATH=. python benchmarks/sequential_damping_kl.py --seeds 0 1 2
    PYTHONPATH=. python benchmarks/sequential_damping_kl.py --summarize
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from emloc import pipeline, sweeps
from emloc.config import PRESETS, RunConfig, merge_dicts
from emloc.statistics import paired_difference, seed_interval

RESULTS = Path("benchmarks/results/sequential_damping")
PREVIOUS = Path("benchmarks/results/emulator_fidelity_3seeds/points.csv")
"""The same points measured before issue 24 (``official_skip`` = independent with the default
``skip_last_down_proj``; ``sequential`` = the damped build truncating under ``C~``)."""
PREVIOUS_SETTING = {"independent": "official_skip", "sequential": "sequential"}
CALIBRATIONS = ("independent", "sequential")
TASK, RATIO = "addition", 0.5
MEASURES = ["kl_all", "kl_response", "top1_agreement", "drift_last"]


def point_config(seed: int, calibration: str) -> RunConfig:
    """The standard preset with the defaults everywhere else (damping 0.01, the last down projection dense)."""
    raw = merge_dicts(PRESETS["standard"], {"seed": seed, "data": {"task": TASK},
                                            "emulator": {"ratio": RATIO, "calibration": calibration}})
    return RunConfig.from_dict(raw)


def measure(run: pipeline.Run, donors: list) -> dict:
    """Calibrate (or adopt a donor's calibration), build and measure fidelity; the point's numbers."""
    sweeps.adopt_finished_stages(run, donors)
    pipeline.run_stages(run, ["calibrate", "build", "fidelity"], verbose=True)
    fidelity, seconds = run.fidelity(), run.stage_seconds()
    return {"kl_all": fidelity["kl"]["all"]["mean"], "kl_response": fidelity["kl"]["response"]["mean"],
            "top1_agreement": fidelity["kl"]["all"]["top1_agreement"],
            "drift_last": fidelity["drift"][-1]["relative_error"], "kl_tokens": fidelity["kl"]["all"]["tokens"],
            "build_seconds": seconds.get("build"), "fidelity_seconds": seconds.get("fidelity")}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def write_rows(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS / "kl.csv", index=False)


def previous_points() -> pd.DataFrame | None:
    """The stored pre-fix points of the same task, ratio and calibrations (emulator alone), or None."""
    if not PREVIOUS.exists():
        return None
    points = pd.read_csv(PREVIOUS)
    points = points[(points["task"] == TASK) & (points["ratio"] == RATIO)
                    & points["setting"].isin(list(PREVIOUS_SETTING.values()))]
    return points.drop_duplicates(["seed", "setting"])


def paired_lines(rows: pd.DataFrame, previous: pd.DataFrame) -> list[str]:
    """Per calibration, the measured minus the stored ``kl_all`` paired by seed (same seeds and test items)."""
    lines = ["", "Measured here minus stored before the fix, `kl_all` paired by seed "
             "(`emloc.statistics.paired_difference`):", ""]
    for calibration, setting in PREVIOUS_SETTING.items():
        now = rows[rows["calibration"] == calibration].set_index("seed")["kl_all"]
        then = previous[previous["setting"] == setting].set_index("seed")["kl_all"]
        seeds = sorted(set(now.index) & set(then.index))
        if len(seeds) > 1:
            mean, low, high = paired_difference(now[seeds].tolist(), then[seeds].tolist())
            lines.append(f"- {calibration}: {mean:+.4f} [{low:+.4f}, {high:+.4f}] over seeds {seeds}")
    return lines


def cell(values) -> str:
    mean, low, high = seed_interval(list(values))
    return f"{mean:.4f} [{low:.4f}, {high:.4f}]" if len(values) > 1 else f"{mean:.4f} (1 seed)"


def summarize(meta: dict | None = None) -> str:
    """``summary.md`` from ``kl.csv`` (and the settings recorded in ``settings.json``)."""
    rows = pd.read_csv(RESULTS / "kl.csv")
    meta = meta or json.loads((RESULTS / "settings.json").read_text(encoding="utf-8"))
    lines = ["# Damped sequential build with the exact truncation: next-token KL", "",
             f"Measured {meta['date']} on {meta['cpu']}, torch {meta['torch']}, {meta['torch_threads']} "
             f"torch thread(s), by `benchmarks/sequential_damping_kl.py`. Model `{meta['model']}`, "
             f"preset `standard` ({meta['n_calibration']} calibration samples, {meta['n_test']} held-out "
             f"prompts), task `{TASK}`, rho {RATIO}, `sequential_damping` {meta['sequential_damping']}, "
             f"`skip_last_down_proj` {meta['skip_last_down_proj']}, `allocation` {meta['allocation']}, "
             f"`compute_dtype` {meta['compute_dtype']}. KL = mean per-token KL(p_original || p_emulator) over all "
             f"positions of the held-out prompts (`emloc.fidelity`, `fidelity.json` `kl.all.mean`); "
             f"intervals: Student-t 95% over seeds (`emloc.statistics.seed_interval`).", "",
             f"Wall time of the run: {meta['wall_seconds'] / 60:.1f} min (build and fidelity seconds per point "
             f"below).", "",
             "## Per seed", "",
             rows.to_markdown(index=False, floatfmt=[".1f" if c.endswith("seconds") else ".4f" for c in rows]), "",
             "## Mean [95% interval] over seeds", "",
             "| calibration | seeds | " + " | ".join(MEASURES) + " |",
             "|:--|--:|" + "--:|" * len(MEASURES)]
    for calibration, group in rows.groupby("calibration", sort=False):
        lines.append(f"| {calibration} | {len(group)} | "
                     + " | ".join(cell(group[m]) for m in MEASURES) + " |")
    previous = previous_points()
    if previous is not None and not previous.empty:
        lines += ["", "## Before the fix (stored, not re-measured here)", "",
                  f"From `{PREVIOUS.as_posix()}` (the same points; sequential = the damped build truncating "
                  f"`W_ls` under `C~`). Same seeds as above where available.", "",
                  "| calibration | seeds | kl_all per seed | kl_all mean [95% interval] |", "|:--|--:|:--|:--|"]
        for calibration, setting in PREVIOUS_SETTING.items():
            seeds = sorted(rows.loc[rows["calibration"] == calibration, "seed"])
            stored = previous[(previous["setting"] == setting) & previous["seed"].isin(seeds)].sort_values("seed")
            if not stored.empty:
                per_seed = ", ".join(f"{s}: {v:.4f}" for s, v in zip(stored["seed"], stored["kl_all"]))
                lines.append(f"| {calibration} (`{setting}`) | {len(stored)} | {per_seed} | "
                             f"{cell(stored['kl_all'])} |")
        lines += paired_lines(rows, previous)
    lines += ["", "## Settings", "", "```json", json.dumps(meta, indent=2), "```", ""]
    text = "\n".join(lines)
    (RESULTS / "summary.md").write_text(text, encoding="utf-8")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--calibrations", nargs="+", choices=CALIBRATIONS, default=list(CALIBRATIONS))
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "emloc_sequential_damping"),
                        help="run directories (finished stages are reused)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarize", action="store_true", help="only rewrite summary.md from kl.csv")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize())
        return 0
    torch.set_num_threads(args.threads)
    config = point_config(args.seeds[0], "sequential")
    meta = environment() | {"model": config.model, "dtype": config.dtype, "task": TASK, "ratio": RATIO,
                            "n_calibration": config.data.n_calibration, "n_test": config.data.n_test,
                            "sequential_damping": config.emulator.sequential_damping,
                            "skip_last_down_proj": config.emulator.skip_last_down_proj,
                            "allocation": config.emulator.allocation, "compute_dtype": config.emulator.compute_dtype,
                            "method": config.emulator.method, "seeds": args.seeds,
                            "emulator_config": config.emulator.__dict__ | {"calibration": list(args.calibrations)}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for seed in args.seeds:
        donors: list = []
        for calibration in args.calibrations:
            run = pipeline.Run(Path(args.out) / f"s{seed}_{calibration}", point_config(seed, calibration))
            donors.append(run)
            print(f"seed {seed}, {calibration}: {time.perf_counter() - start:.0f} s elapsed", flush=True)
            rows.append({"seed": seed, "calibration": calibration, **measure(run, donors)})
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
            write_rows(rows)
        meta["wall_seconds"] = round(time.perf_counter() - start, 1)
        (RESULTS / "settings.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        summarize(meta)
    print(summarize(meta))
    record_provenance(args.calibrations, args.seeds)
    return 0


def record_provenance(calibrations: list[str], seeds: list[int]) -> None:
    """The settings of every point (less the seed), the commit and the machine (:mod:`emloc.provenance`)."""
    from emloc import provenance
    configs = {c: {"preset": "standard", "data": {"task": TASK}, "emulator": {"ratio": RATIO, "calibration": c}}
               for c in calibrations}
    provenance.write(RESULTS, provenance.record(configs, command="python benchmarks/sequential_damping_kl.py",
                                                seeds=list(seeds)))


if __name__ == "__main__":
    raise SystemExit(main())
