"""Did the adapter learn to compensate the emulator's error? The correction's diagnostics under today's defaults,
5 seeds, from the clamp sweeps' adapters -> benchmarks/results/correction_diagnostics/.

    PYTHONPATH=. python benchmarks/correction_diagnostics.py

Per module the correction stage writes ``update_mismatch_cosine`` (``<U, M> / (|U| |M|)``) and
``update_mismatch_coefficient`` (``c = <U, M> / |M|^2``: ``U ~ c M`` in least squares, 1 = the adapter undid all
of the emulator's error ``M``, 0 = none of it) to ``correction/report.csv``; both depend on the adapter and the
emulator only, not on the clamp. Sources: every finished point of the clamp sweeps of
:data:`schedule_tables.CLAMP_SOURCES` (addition at 100 and 300 steps, wordfacts at 50, 100 and 300; each seed's
adapter is the same at every lambda) under ``benchmarks/out/<sweep>/points/``, as their grid files' commands leave
them. Writes ``runs.csv`` (one row per task, steps and seed: the module means and the largest ``c``) and
``summary.md``/``.csv`` (per task and steps: the means over seeds with their Student-t 95% intervals, and the
range over runs). Without the sweeps' folders (a fresh clone) it recomputes the summary from the stored
``runs.csv``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, RESULTS  # noqa: E402
from schedule_tables import CLAMP_SOURCES  # noqa: E402

from emloc import io, provenance, statistics, sweep_tables  # noqa: E402

FOLDER = RESULTS / "correction_diagnostics"
COMPENSATES = 0.1
"""A module whose ``c`` reaches this has undone a tenth of the emulator's error on it: counted per run."""


def run_row(report: pd.DataFrame) -> dict:
    """One run's diagnostics: module means of the cosine and ``c``, the largest ``c``, and how many modules
    reach :data:`COMPENSATES` (``report``: the correction's per-module ``report.csv``)."""
    c = report["update_mismatch_coefficient"]
    return {"cosine_mean": float(report["update_mismatch_cosine"].mean()), "c_mean": float(c.mean()),
            "c_max": float(c.max()), "modules": len(report), "modules_compensating": int((c >= COMPENSATES).sum())}


def collect(out: Path = OUT) -> pd.DataFrame:
    """``runs.csv`` from the clamp sweeps' points: one row per (task, steps, seed), read from its first finished
    lambda point (every lambda holds the same adapter)."""
    rows = []
    for (task, steps), name in sorted(CLAMP_SOURCES.items()):
        folder = out / name
        if not (folder / "grid.yaml").exists():
            continue
        seen = set()
        for point in sorted((folder / "points").iterdir()):
            report, config = point / "correction" / "report.csv", point / "config.yaml"
            seed = int(io.read_yaml(config)["seed"]) if config.exists() else None
            if seed is None or seed in seen or not report.exists():
                continue
            seen.add(seed)
            rows.append({"task": task, "lora.steps": steps, "seed": seed, "sweep": name,
                         **run_row(pd.read_csv(report))})
    return pd.DataFrame(rows)


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, steps): the seed means of the cosine and ``c`` with their intervals, the largest module ``c``
    of any run and the most modules any run had at :data:`COMPENSATES` or above."""
    rows = []
    for (task, steps), group in runs.groupby(["task", "lora.steps"]):
        cosine, c = (statistics.seed_interval(group[column]) for column in ("cosine_mean", "c_mean"))
        rows.append({"task": task, "lora.steps": steps, "seeds": len(group),
                     "update/mismatch cosine": _interval(cosine), "c (module mean)": _interval(c),
                     "c per run": f"{group['c_mean'].min():.1e} to {group['c_mean'].max():.1e}",
                     "largest module c": f"{group['c_max'].max():.1e}",
                     f"modules with c >= {COMPENSATES:g}": f"{group['modules_compensating'].max()} of "
                                                           f"{group['modules'].max()}"})
    return pd.DataFrame(rows)


def _interval(mean_low_high: tuple[float, float, float]) -> str:
    mean, low, high = mean_low_high
    return f"{mean:.1e} [{low:.1e}, {high:.1e}]"


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    runs = collect()
    if len(runs):
        runs.to_csv(FOLDER / "runs.csv", index=False)
        sources = sorted(runs["sweep"].unique())
        provenance.write(FOLDER, {"declares": provenance.DERIVED, "from": sources,
                                  "command": "PYTHONPATH=. python benchmarks/correction_diagnostics.py"})
    runs = pd.read_csv(FOLDER / "runs.csv")
    table = summary(runs)
    table.to_csv(FOLDER / "summary.csv", index=False)
    (FOLDER / "summary.md").write_text(sweep_tables.as_markdown(table), encoding="utf-8")
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
