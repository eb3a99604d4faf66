#!/usr/bin/env bash
# Regenerate every table and figure of benchmarks/README.md (one command; about an hour on 2 busy CPU cores).
#   bash benchmarks/run_all.sh            # everything (the sweep resumes from finished points)
#   SKIP_SWEEP=1 bash benchmarks/run_all.sh   # benchmarks only, sweep tables from finished points
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TQDM_DISABLE=1
if [ -z "${SKIP_SWEEP:-}" ]; then
  $PY -m emloc sweep --grid benchmarks/grids/reduced.yaml --out benchmarks/out/sweep_reduced --tables benchmarks/results/sweep_reduced
else
  $PY -m emloc sweep --grid benchmarks/grids/reduced.yaml --out benchmarks/out/sweep_reduced --tables benchmarks/results/sweep_reduced --tables-only
fi
$PY benchmarks/bench_construction.py
$PY benchmarks/bench_training_step.py --ratio 0.5
$PY benchmarks/bench_memory.py
$PY benchmarks/bench_memory_ledger.py
$PY benchmarks/summarize.py
