#!/usr/bin/env bash
# Regenerate every table and figure of benchmarks/README.md (one command). The sweeps resume from finished
# points; from nothing they take several hours on 2 CPU cores (see benchmarks/README.md for measured times).
#   bash benchmarks/run_all.sh                # everything
#   SKIP_SWEEP=1 bash benchmarks/run_all.sh   # benchmarks only; sweep tables from the finished points
#   SKIP_BIG=1 ...                            # without the 1.5B memory point (about 25 minutes, 6 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TQDM_DISABLE=1
ONLY_TABLES=${SKIP_SWEEP:+--tables-only}
$PY -m emloc sweep --grid benchmarks/grids/addition.yaml --out benchmarks/out/sweep_addition \
  --tables benchmarks/results/sweep_addition $ONLY_TABLES
$PY -m emloc sweep --grid benchmarks/grids/reduced.yaml --out benchmarks/out/sweep_reduced \
  --tables benchmarks/results/sweep_reduced $ONLY_TABLES
CORRECTION="--tasks addition wordfacts --ratios 0.5 --steps 50 100 300 --seeds 0 1 2 --n-test 100
  --settings official_l3 official_l1 official_l10 official_none aligned activation_aware_l3"
if [ -z "${SKIP_SWEEP:-}" ]; then
  $PY benchmarks/correction_sweep.py $CORRECTION --out benchmarks/results/correction
else
  $PY benchmarks/correction_sweep.py --summarize --out benchmarks/results/correction
fi
$PY benchmarks/bench_construction.py
$PY benchmarks/bench_training_step.py --ratio 0.5
$PY benchmarks/bench_memory.py
if [ -z "${SKIP_BIG:-}" ]; then
  [ -f runs/big-llama/config.json ] || $PY benchmarks/make_big_model.py runs/big-llama
  $PY benchmarks/bench_memory.py --big runs/big-llama
  $PY benchmarks/bench_memory.py --big runs/big-llama --big-timing --big-steps 4 --big-rounds 3
fi
$PY benchmarks/bench_step_scaling.py  # step time across widths up to Llama-3-8B's (about 25 minutes)
$PY benchmarks/bench_memory_ledger.py
$PY benchmarks/summarize.py
$PY benchmarks/render_docs.py  # the tables quoted in the docs, from the files just written
