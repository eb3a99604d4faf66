"""Where a run's evaluation time goes: per variant, loading the model (and its adapter) against scoring and
generating on the test split, next to the run's other stages.

    python benchmarks/bench_evaluation.py RUN_DIR        # a finished run (e.g. of `emloc run --preset standard`)

Evaluates every variant the run would evaluate, in one process, timing ``open`` (the variant's loader: the
original model, the emulator, a peft adapter loaded on either), ``evaluate`` (the loss pass and greedy
generation, :func:`emloc.evaluation.evaluate_model`) and ``close``; prints the table and the share of the
evaluation in the run (its other stages' seconds from the run's manifests). Writes
``benchmarks/results/evaluation_share.json`` with its provenance record.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_variants(run) -> list[dict]:
    from emloc.evaluation import evaluate_model
    from emloc.pipeline import _variant, variant_loaders
    from emloc.stages import VARIANT_SPECS, evaluated
    factors = run.factors()
    loaders = variant_loaders(run, factors)
    chosen = evaluated([v.name for v in VARIANT_SPECS if v.adapter is None or run.is_done(v.stage)],
                       factors.corrects)
    cfg, rows = run.config, []
    for name in chosen:
        start = time.perf_counter()
        context = _variant(loaders[name])
        model = context.__enter__()
        opened = time.perf_counter()
        evaluate_model(model, run.tokenizer, run.data, cfg.data.max_length, cfg.evaluation.max_new_tokens,
                       cfg.evaluation.batch_size)
        scored = time.perf_counter()
        context.__exit__(None, None, None)
        rows.append({"variant": name, "open_s": opened - start, "evaluate_s": scored - opened,
                     "close_s": time.perf_counter() - scored})
    return rows


def main(argv: list[str]) -> int:
    import pandas as pd
    import torch

    from emloc import io, pipeline, provenance
    run_dir = Path(argv[0])  # torch's default threads, as `emloc run` uses them
    run = pipeline.Run(run_dir, progress=False)
    table = pd.DataFrame(timed_variants(run)).set_index("variant")
    evaluation = float(table.to_numpy().sum())
    others = {stage: seconds for stage, seconds in run.stage_seconds().items() if stage != "evaluate"}
    share = evaluation / (evaluation + sum(others.values()))
    print(table.round(2).to_string())
    print(f"evaluation {evaluation:.1f} s (open {table['open_s'].sum():.1f} s, evaluate "
          f"{table['evaluate_s'].sum():.1f} s); other stages {sum(others.values()):.1f} s {others}; "
          f"evaluation's share of the run: {share:.1%}")
    result = {"variants": table.reset_index().to_dict("records"), "evaluation_s": evaluation,
              "other_stages_s": others, "evaluation_share": share, "threads": torch.get_num_threads(),
              "training_steps": run.config.lora.steps}
    target = ROOT / "benchmarks" / "results" / "evaluation_share.json"
    io.write_json(target, result)
    overrides = {key: value for key, value in run.config.to_dict().items() if key in ("data", "lora", "evaluation")}
    provenance.write(target, provenance.record({"run": overrides},
                                               command="python benchmarks/bench_evaluation.py RUN_DIR"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
