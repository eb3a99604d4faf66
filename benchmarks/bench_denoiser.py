"""The base digits denoiser: pretraining time on one thread and how often the judge reads its samples as the
digit asked for (issue 22's bar: at least 85% within 15 minutes on one thread).

    python benchmarks/bench_denoiser.py [SEED ...]        # default: seed 0

Pretrains the ``standard`` preset afresh for each seed (one torch thread, in a scratch folder: the cache is
not used, so the time is measured), samples 50 images of each trained digit (DDIM, classifier-free
guidance) and prints the judged share per digit with a Wilson interval over all samples. Writes
``benchmarks/results/denoiser.json`` with its provenance record.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 50


def main(argv: list[str]) -> int:
    import dataclasses

    import torch

    from emloc import denoiser, io, provenance
    from emloc.statistics import wilson_interval

    torch.set_num_threads(1)
    seeds = [int(seed) for seed in argv] or [0]
    preset = denoiser.DENOISER_PRESETS["standard"]
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as scratch:
            folder = denoiser.pretrained_denoiser_path("standard", seed, progress=False,
                                                       folder=Path(scratch) / "denoiser")
            record = denoiser.pretraining_record(folder)
            model = denoiser.load_denoiser(folder)
        table = denoiser.judged_accuracy(model, preset, per_class=PER_CLASS, seed=1000 + seed)
        shares = table["share_judged_as_asked"]
        correct, total = int(round(shares.sum() * PER_CLASS)), PER_CLASS * len(shares)
        low, high = wilson_interval(correct, total)
        rows.append({"seed": seed, "pretraining_s": record["seconds"], "steps": record["steps"],
                     "final_loss": record["final_loss"], "judged_as_asked": correct / total, "low": low,
                     "high": high, "samples": total, "per_digit": {int(d): float(s) for d, s in shares.items()}})
        print(f"seed {seed}: {record['steps']} steps in {record['seconds']:.0f} s on one thread; "
              f"{correct / total:.1%} [{low:.1%}, {high:.1%}] of {total} samples judged the digit asked for; "
              f"per digit {', '.join(f'{d}: {s:.0%}' for d, s in shares.items())}", flush=True)
    target = ROOT / "benchmarks" / "results" / "denoiser.json"
    io.write_json(target, {"preset": dataclasses.asdict(preset), "threads": 1, "per_class": PER_CLASS,
                           "held_out": denoiser.HELD_OUT_DIGIT, "seeds": rows})
    table = target.with_suffix(".md")
    table.write_text(markdown_table(rows) + "\n", encoding="utf-8")
    record = provenance.record({}, command="python benchmarks/bench_denoiser.py " + " ".join(map(str, seeds)),
                               denoiser_preset="standard")
    provenance.write([target, table], record)
    return 0


def markdown_table(rows: list[dict]) -> str:
    """One row per seed: steps, seconds, the judged share with its Wilson interval, the weakest digit."""
    import pandas as pd
    return pd.DataFrame([{
        "seed": row["seed"], "steps": row["steps"], "pretraining (s, one thread)": f"{row['pretraining_s']:.0f}",
        "judged the digit asked for": f"{row['judged_as_asked']:.3f} [{row['low']:.3f}, {row['high']:.3f}]",
        "samples": row["samples"],
        "weakest digit": "{0}: {1:.2f}".format(*min(row["per_digit"].items(), key=lambda item: item[1])),
    } for row in rows]).to_markdown(index=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
