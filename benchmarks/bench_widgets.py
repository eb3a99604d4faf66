"""Benchmark of the teaching suite (issue 3). Prints:

* slider -> updated figure latency (median and p90 over several changes) of the spectrum explorer,
  the error map and the correction inspector, on the shared notebook run (default model, quick preset;
  missing stages are computed first). The time covers the observer's whole work: the core call, the
  in-place trace update and re-serialising the figure into the Output widget.
* wall time of ``00_quickstart`` under nbval from an empty run directory (it computes the whole
  pipeline), then of ``01``-``05`` reusing it, and their sum (the whole notebook suite).

Usage: ``python benchmarks/bench_widgets.py [--run DIR] [--repeats N] [--skip-notebooks]``
Targets (issue 3): <= 100 ms per slider change; quickstart <= 3 min; whole suite <= 20 min (2 cores).
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def latency(control, values, repeats: int) -> tuple[float, float]:
    """Median and p90 milliseconds of ``control.value = v`` (observers run synchronously)."""
    times = []
    for value in itertools.islice(itertools.cycle(values), repeats):
        start = time.perf_counter()
        control.value = value
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def bench_widgets(run_dir: str | None, repeats: int) -> None:
    import widgets
    from emloc import pipeline
    from emloc.notebook import ensure, notebook_run

    run = pipeline.Run(run_dir) if run_dir else notebook_run()
    ensure(run, "correct")
    factors = run.factors()
    print(f"run {run.dir}: {len(factors.report)} compressed modules, model {run.config.model}")
    explorer = widgets.spectrum_explorer(factors)
    explorer.type_dropdown.value = "gate_proj"
    n = explorer.rank_slider.max
    views = {
        "spectrum explorer (rank slider)": (explorer.rank_slider, [n // 8, n // 4, n // 2, n, 1, n // 3]),
        "spectrum explorer (layer slider)": (explorer.layer_slider, list(explorer.layer_slider.options)[::3]),
        "error map (ratio slider)": (widgets.error_map(factors).ratio_slider, [0.1, 0.3, 0.5, 0.7, 0.9, 0.25, 0.6]),
        "correction inspector (lambda slider)": (
            widgets.correction_inspector(run.correction_report(), run.correction_tensors(),
                                         run.config.correction.clamp).lambda_slider, [0.3, 1.0, 3.0, 10.0, 30.0, 0.5]),
    }
    print(f"slider -> updated figure latency over {repeats} changes (target <= 100 ms):")
    for name, (control, values) in views.items():
        median, p90 = latency(control, values, repeats)
        print(f"  {name:40s} median {median:7.1f} ms   p90 {p90:7.1f} ms")


def time_notebook(path: Path, run_dir: Path) -> tuple[float, int]:
    env = {**os.environ, "EMLOC_NOTEBOOK_RUN": str(run_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", str(path), "--nbval-lax", "--nbval-current-env", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode


def bench_notebooks() -> None:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    print("notebook wall time under nbval (fresh run directory; 00 computes the pipeline, later ones reuse it):")
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="emloc-bench-notebooks-") as scratch:
        for path in notebooks:
            seconds, code = time_notebook(path, Path(scratch) / "run")
            total += seconds
            print(f"  {path.name:36s} {seconds:7.1f} s  {'passed' if code == 0 else f'FAILED (exit {code})'}")
    print(f"  {'whole suite':36s} {total:7.1f} s   (targets: quickstart <= 180 s, suite <= 1200 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory with a finished 'correct' stage (default: the notebook run)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-notebooks", action="store_true")
    args = parser.parse_args()
    print(f"cores visible: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    bench_widgets(args.run, args.repeats)
    if not args.skip_notebooks:
        bench_notebooks()


if __name__ == "__main__":
    main()
