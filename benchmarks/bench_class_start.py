"""A class that never waits: seconds from a fresh clone with a prepared bundle to the quickstart's results board.

What a student does at the start of a session, with the environment already installed (a wheelhouse or a
packed environment, see docs/teaching.md): clone the repository, unpack the instructor's bundle, open
notebook 00 and run it. Timed here, each step in a fresh process:

1. ``git clone`` of this repository into a temporary folder;
2. ``python -m emloc.bundle unpack BUNDLE`` inside the clone;
3. notebook 00 executed by a real Jupyter kernel (nbclient) in the clone's ``notebooks/`` folder, from kernel
   start to the end of the results-board cell.

Without ``--bundle`` the instructor's part is done first (``emloc run`` per seed, then ``bundle pack``) and
timed separately. Writes ``benchmarks/results/class_start.json``.

    PYTHONPATH=. python benchmarks/bench_class_start.py [--bundle runs/class_bundle.tar.gz] [--preset quick --seeds 0]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BOARD_CALL = "widgets.results_board("


def timed(command: list[str], cwd: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def prepare_bundle(folder: Path, preset: str, seeds: list[int]) -> tuple[Path, float]:
    """The instructor's part: one run per seed and the packed bundle; returns (bundle, seconds)."""
    start = time.perf_counter()
    runs = []
    for seed in seeds:
        runs.append(folder / f"seed{seed}")
        subprocess.run([sys.executable, "-m", "emloc.cli", "run", "--preset", preset, "--seed", str(seed),
                        "--out", str(runs[-1])], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    bundle = folder / "class_bundle.tar.gz"
    subprocess.run([sys.executable, "-m", "emloc.bundle", "pack", *map(str, runs), "--out", str(bundle)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return bundle, time.perf_counter() - start


def bundle_runs(clone: Path) -> list[dict]:
    """What the unpacked bundle holds: each run's seed, LoRA steps and training-set size (from its config)."""
    runs = []
    for config_file in sorted((clone / "runs" / "class").glob("*/config.yaml")):
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        runs.append({"run": config_file.parent.name, "seed": config["seed"], "lora_steps": config["lora"]["steps"],
                     "n_train": config["data"]["n_train"]})
    return runs


def notebook_to_board(clone: Path) -> tuple[float, float]:
    """Run notebook 00 in the clone; returns (seconds to the results board, seconds for the whole notebook)."""
    notebook = nbformat.read(clone / "notebooks" / "00_quickstart.ipynb", as_version=4)
    board_cell = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and BOARD_CALL in c.source)
    reached = {}

    def on_cell_executed(cell, cell_index, **_):
        if cell_index == board_cell:
            reached["board"] = time.perf_counter()

    client = NotebookClient(notebook, kernel_name="python3", timeout=900,
                            resources={"metadata": {"path": str(clone / "notebooks")}},
                            on_cell_executed=on_cell_executed)
    start = time.perf_counter()
    # the kernel imports the clone's emloc, which finds the clone's runs/
    client.execute(env={**os.environ, "PYTHONPATH": str(clone)})
    return reached["board"] - start, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="a prepared class bundle (default: prepare one first, timed apart)")
    parser.add_argument("--preset", default="quick", help="preset of the runs prepared when --bundle is absent")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args(argv)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="emloc_class_") as scratch:
        scratch = Path(scratch)
        if args.bundle:
            bundle = Path(args.bundle).resolve()
        else:
            bundle, figures["instructor_prepare_s"] = prepare_bundle(scratch / "instructor", args.preset, args.seeds)
            figures.update(preset=args.preset, seeds=args.seeds)
        figures["bundle_mb"] = bundle.stat().st_size / 2**20
        clone = scratch / "clone"
        figures["clone_s"] = timed(["git", "clone", "--quiet", str(ROOT), str(clone)], cwd=scratch)
        figures["unpack_s"] = timed([sys.executable, "-m", "emloc.bundle", "unpack", str(bundle)], cwd=clone,
                                    env={**os.environ, "PYTHONPATH": str(clone)})
        figures["bundle_runs"] = bundle_runs(clone)
        figures["notebook_to_board_s"], figures["notebook_total_s"] = notebook_to_board(clone)
    figures["clone_to_board_s"] = figures["clone_s"] + figures["unpack_s"] + figures["notebook_to_board_s"]
    figures["target_s"] = 60
    figures["cpu_threads"] = os.cpu_count()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "class_start.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    for key, value in figures.items():
        print(f"{key:>22}: {value:.1f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
