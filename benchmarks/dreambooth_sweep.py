"""EMLoC on the digits denoiser, measured: every variant of ``emloc run --model digits-dit`` at several ratios
and seeds, activation-aware against plain SVD (the official FLUX recipe), corrected against uncorrected, and
the adaLN modulation and timestep layers kept dense or compressed.

    python benchmarks/dreambooth_sweep.py [--seeds 0 1 2 3 4] [--ratios 0.5 0.25] [--samples 50] [--jobs 2]
    python benchmarks/dreambooth_sweep.py --summarize

Points: ``(activation_aware, plain) x ratios`` with the conditioning layers dense (the default), plus
activation-aware at the first ratio with them compressed. Each (point, seed) is a run directory under
``--runs`` made by the pipeline's own loop (``pipeline.run_stages``, what ``emloc run`` calls); a seed's
points adopt its LoRA on the original (same fingerprint). The base denoiser is the cached ``digits-dit``
(pretraining seed 0); the seed draws the subject and prior images, LoRA's initialisation, the batches, the
noise and the samples. One torch thread per job; ``--jobs`` runs seeds side by side.

Rows go to ``benchmarks/results/dreambooth/rows_seed<k>.csv`` (one per point and variant; an interrupted sweep
resumes). ``--summarize`` writes ``summary.md`` and ``summary.csv`` (each metric's mean over seeds with its 95%
Student-t interval over seeds) and ``comparisons.md`` (paired differences by seed, with the sentence each interval reads as).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "dreambooth"
ROWS = "rows_seed{seed}.csv"
"""One rows file per seed (seeds are measured side by side)."""
METRICS = ("subject_fidelity", "prior_preservation", "memorisation", "quality")
HIGHER_IS_BETTER = {"subject_fidelity": True, "prior_preservation": True, "memorisation": True,
                    "quality": True}
"""Memorisation is a distance to the nearest subject image: higher is further from copying."""
FINDINGS = ("subject_fidelity", "prior_preservation")
"""The metrics whose comparisons ``findings.md`` states as sentences."""
FIELDS = ["point", "method", "ratio", "conditioning", "seed", "variant", *METRICS, "n",
          "noise_prediction_error", "train_seconds"]


def points(ratios: list[float]) -> list[dict]:
    """The measured settings: both methods at every ratio (conditioning dense), and activation-aware at the
    first ratio with the conditioning layers compressed."""
    grid = [{"method": method, "ratio": ratio, "conditioning": "dense"}
            for ratio in ratios for method in ("activation_aware", "plain")]
    grid.append({"method": "activation_aware", "ratio": ratios[0], "conditioning": "compressed"})
    return [point | {"point": f"{point['method']}_r{point['ratio']:g}_{point['conditioning']}"} for point in grid]


def run_config(point: dict, seed: int, samples: int, model: str = "digits-dit") -> dict:
    return {"model": model, "seed": seed, "device": "cpu",
            "emulator": {"method": point["method"], "ratio": point["ratio"]},
            "dreambooth": {"samples_per_digit": samples,
                           "keep_conditioning_dense": point["conditioning"] == "dense"}}


def done_points(seed: int) -> set[str]:
    path = RESULTS / ROWS.format(seed=seed)
    if not path.exists():
        return set()
    with path.open(encoding="utf-8") as handle:
        return {row["point"] for row in csv.DictReader(handle)}


def measure_seed(seed: int, ratios: list[float], samples: int, runs: Path, model: str) -> None:
    """Every point of one seed (in this process, one thread), appending rows as points finish."""
    import torch

    from emloc import io, pipeline, sweeps
    from emloc.config import RunConfig
    torch.set_num_threads(1)
    finished = done_points(seed)
    done_runs = []
    for point in points(ratios):
        run = pipeline.Run(runs / point["point"] / f"seed{seed}",
                           RunConfig.from_dict(run_config(point, seed, samples, model)), progress=False)
        sweeps.adopt_finished_stages(run, done_runs)
        pipeline.run_stages(run)
        done_runs.append(run)
        if point["point"] in finished:
            continue
        results, fidelity = run.results(), run.fidelity()
        training = io.read_json(run.dir / "training" / "emulator_lora.json")
        rows = [{**point, "seed": seed, "variant": variant, **{m: figures[m] for m in METRICS}, "n": figures["n"],
                 "noise_prediction_error": fidelity["relative_error"], "train_seconds": training["seconds"]}
                for variant, figures in results["variants"].items()]
        write_rows(seed, rows)
        print(f"seed {seed} {point['point']}: done", flush=True)


def write_rows(seed: int, rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ROWS.format(seed=seed)
    new = not path.exists()
    with path.open("a", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


# ---- tables -----------------------------------------------------------------------------------------

def summary_table(long):
    """Per point and variant (wide): each metric's mean over seeds with its 95% t interval over seeds."""
    long = long.copy()
    long["shown"] = [f"{r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]" for r in long.itertuples()]
    wide = long.pivot_table(index=["point", "variant", "seeds"], columns="metric", values="shown",
                            aggfunc="first", sort=False)
    return wide[list(METRICS)].reset_index()


def paired(rows, point_a: str, variant_a: str, point_b: str, variant_b: str, metric: str):
    """``(mean, low, high)`` of A - B paired by seed, over the seeds both have."""
    from emloc.statistics import paired_difference
    a = rows[(rows["point"] == point_a) & (rows["variant"] == variant_a)].set_index("seed")[metric]
    b = rows[(rows["point"] == point_b) & (rows["variant"] == variant_b)].set_index("seed")[metric]
    seeds = sorted(set(a.index) & set(b.index))
    return paired_difference(a[seeds].tolist(), b[seeds].tolist()), len(seeds)


def comparisons(rows, ratios: list[float]) -> list[dict]:
    """The questions the issue asks, each a paired difference by seed per metric: ``setting``, what A and B
    are, and where each is measured (point, variant)."""
    from emloc.statistics import verdict
    questions = []
    for ratio in ratios:
        aware, plain = (f"{method}_r{ratio:g}_dense" for method in ("activation_aware", "plain"))
        for point, method in ((aware, "activation-aware"), (plain, "plain")):
            questions.append((f"ratio {ratio:g}, {method} emulator", "corrected transfer", "uncorrected transfer",
                              point, "transfer_corrected", point, "transfer_uncorrected"))
        questions += [
            (f"ratio {ratio:g}", "EMLoC (activation-aware, corrected)", "the official recipe (plain, uncorrected)",
             aware, "transfer_corrected", plain, "transfer_uncorrected"),
            (f"ratio {ratio:g}, no adapter", "the activation-aware emulator", "the plain emulator",
             aware, "emulator", plain, "emulator"),
            (f"ratio {ratio:g}", "EMLoC", "LoRA on the original", aware, "transfer_corrected", aware, "full_lora")]
    first = f"activation_aware_r{ratios[0]:g}"
    questions.append((f"ratio {ratios[0]:g}, EMLoC", "conditioning compressed", "conditioning dense",
                      f"{first}_compressed", "transfer_corrected", f"{first}_dense", "transfer_corrected"))
    out = []
    for setting, a, b, point_a, variant_a, point_b, variant_b in questions:
        for metric in METRICS:
            (mean, low, high), seeds = paired(rows, point_a, variant_a, point_b, variant_b, metric)
            if seeds:
                out.append({"setting": setting, "a": a, "b": b, "metric": metric, "difference": mean, "low": low,
                            "high": high, "seeds": seeds,
                            "reads": verdict(low, high, HIGHER_IS_BETTER[metric])})
    return out


def findings(table) -> str:
    """The comparisons on :data:`FINDINGS` as sentences produced from their intervals (a one-column table)."""
    from emloc.statistics import comparison_sentence
    lines = [f"| {r.setting}: {comparison_sentence(r.a, r.b, (r.difference, r.low, r.high), r.metric.replace('_', ' '), HIGHER_IS_BETTER[r.metric], r.seeds)} |"
             for r in table.itertuples() if r.metric in FINDINGS]
    return "| finding (paired by seed, 95% interval) |\n|---|\n" + "\n".join(lines) + "\n"


def summarize(ratios: list[float], command: str) -> None:
    import pandas as pd

    from emloc import provenance
    rows = pd.concat([pd.read_csv(path) for path in sorted(RESULTS.glob(ROWS.format(seed="*")))],
                     ignore_index=True)
    from emloc.reports import seed_summary
    long = seed_summary(rows, ["point", "variant"], list(METRICS))
    long.to_csv(RESULTS / "summary.csv", index=False)
    summary = summary_table(long)
    fidelity = (rows.drop_duplicates(["point", "seed"]).groupby("point", sort=False)["noise_prediction_error"]
                .agg(["mean", "min", "max"]).round(4).reset_index())
    (RESULTS / "summary.md").write_text(
        summary.to_markdown(index=False) + "\n\nThe emulator's noise-prediction error (`||eps' - eps|| / ||eps||`,"
        " per point over seeds: mean, min, max):\n\n" + fidelity.to_markdown(index=False) + "\n", encoding="utf-8")
    table = pd.DataFrame(comparisons(rows, ratios))
    lines = [f"| {r.setting} | {r.a} vs {r.b} | {r.metric} | {r.difference:+.3f} [{r.low:+.3f}, {r.high:+.3f}] "
             f"| {r.reads} | {r.seeds} |" for r in table.itertuples()]
    header = ("| setting | A vs B | metric | A - B, paired by seed | A | seeds |\n"
              "|---|---|---|---:|---|---:|\n")
    (RESULTS / "comparisons.md").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    table.to_csv(RESULTS / "comparisons.csv", index=False)
    (RESULTS / "findings.md").write_text(findings(table), encoding="utf-8")
    print((RESULTS / "summary.md").read_text(), (RESULTS / "comparisons.md").read_text(), sep="\n")
    samples = int(rows["n"].iloc[0]) // 10
    configs = {p["point"]: run_config(p, 0, samples) | {"seed": 0} for p in points(ratios)}
    record = provenance.record(configs, command=command, seeds=sorted(int(s) for s in rows["seed"].unique()))
    provenance.write(RESULTS, record)


def main(argv: list[str] | None = None) -> int:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--samples", type=int, default=50, help="samples per digit in the evaluation")
    parser.add_argument("--jobs", type=int, default=1, help="seeds measured side by side, one thread each")
    parser.add_argument("--runs", default="benchmarks/out/dreambooth")
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument("--model", default="digits-dit", help="digits-dit-tiny: a smoke test (with --results)")
    parser.add_argument("--results", default="benchmarks/results/dreambooth", help="where rows and tables go")
    parser.add_argument("--seed-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    RESULTS = ROOT / args.results
    command = (f"python benchmarks/dreambooth_sweep.py --seeds {' '.join(map(str, args.seeds))} --ratios "
               f"{' '.join(f'{r:g}' for r in args.ratios)} --samples {args.samples}")
    if args.summarize:
        summarize(args.ratios, command)
        return 0
    if args.seed_child is not None:
        measure_seed(args.seed_child, args.ratios, args.samples, Path(args.runs), args.model)
        return 0
    from emloc import denoiser
    from emloc.config import DIFFUSION_MODELS
    denoiser.pretrained_denoiser_path(DIFFUSION_MODELS[args.model], 0)  # pretrained once, before the jobs share it
    pending = list(args.seeds)
    common = ["--ratios", *map(str, args.ratios), "--samples", str(args.samples), "--runs", args.runs,
              "--model", args.model, "--results", args.results]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    while pending:
        batch, pending = pending[:args.jobs], pending[args.jobs:]
        children = [subprocess.Popen([sys.executable, __file__, "--seed-child", str(seed), *common], cwd=ROOT,
                                     env=environ) for seed in batch]
        if any(child.wait() != 0 for child in children):
            raise SystemExit("a seed failed: see its output above")
    summarize(args.ratios, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
