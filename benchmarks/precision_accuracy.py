"""Does ``bf16-mixed`` training change what a run learns? Paired by seed against the 32-true reference.

    python benchmarks/precision_accuracy.py --runs RUN [RUN ...]
        [--reference benchmarks/results/sweep_addition_5seeds/seeds.csv]

``RUN``: finished ``emloc run --preset standard --seed S --precision bf16-mixed`` (or ``auto`` on a CPU with
native bfloat16) directories, e.g. those of ``make class``. The reference is the 5-seed addition sweep at
today's defaults (standard preset, ``32-true``, EMLoC points ``emulator.method = activation_aware``), measured
on the same test items. For every variant, the per-seed difference bf16-mixed - 32-true in accuracy and loss,
with a seed-level t interval and its verdict (``emloc.statistics``). Writes
``benchmarks/results/precision/accuracy.{json,md}`` with a provenance record.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emloc import io, provenance, statistics  # noqa: E402
from emloc.config import PRESETS, RunConfig, merge_dicts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "precision"
COMPARED = ("data", "emulator", "lora", "correction", "evaluation")
"""Config sections that must match the reference's standard preset (``lora.precision`` aside)."""


def run_rows(run_dir: Path) -> pd.DataFrame:
    """One row per variant of a finished run: seed, variant, accuracy, loss; the run's config checked."""
    results = json.loads((run_dir / "results.json").read_text())
    config = results["config"]
    standard = RunConfig.from_dict(merge_dicts(RunConfig().to_dict(), PRESETS["standard"])).to_dict()
    skipped = {"precision", "target_modules"}  # the run stores 'auto' resolved to the model's module types
    for section in COMPARED:
        mine = {k: v for k, v in config[section].items() if k not in skipped}
        theirs = {k: v for k, v in standard[section].items() if k not in skipped}
        if mine != theirs:
            raise SystemExit(f"{run_dir}: config section {section!r} differs from the standard preset's; "
                             f"compare like with like")
    training = json.loads((run_dir / "training" / "emulator_lora.json").read_text())
    if training.get("precision") != "bf16-mixed":
        raise SystemExit(f"{run_dir} trained with {training.get('precision')}, not bf16-mixed")
    return pd.DataFrame([{"seed": config["seed"], "variant": variant, "accuracy": row["accuracy"],
                          "loss": row["loss"]} for variant, row in results["variants"].items()])


def compare(bf16: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Per variant: mean bf16-mixed - 32-true over the shared seeds, with interval and verdict."""
    rows = []
    for variant, mine in bf16.groupby("variant", sort=False):
        theirs = reference[reference["variant"] == variant].set_index("seed")
        paired = mine.set_index("seed").join(theirs, rsuffix="_32", how="inner").sort_index()
        if paired.empty:
            continue
        row = {"variant": variant, "seeds": len(paired)}
        for metric, higher_is_better in (("accuracy", True), ("loss", False)):
            mean, low, high = statistics.paired_difference(paired[metric], paired[f"{metric}_32"])
            row |= {f"{metric}_32_true": paired[f"{metric}_32"].mean(),
                    f"{metric}_bf16": paired[metric].mean(), f"{metric}_difference": mean,
                    f"{metric}_low": low, f"{metric}_high": high,
                    f"{metric}_verdict": statistics.verdict(low, high, higher_is_better)}
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    lines = ["| variant | seeds | accuracy 32-true | accuracy bf16-mixed | difference [95%] "
             "| loss difference [95%] | reads |", "|---|---:|---:|---:|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.variant} | {row.seeds} | {row.accuracy_32_true:.3f} | {row.accuracy_bf16:.3f} "
                     f"| {row.accuracy_difference:+.3f} [{row.accuracy_low:+.3f}, {row.accuracy_high:+.3f}] "
                     f"| {row.loss_difference:+.3f} [{row.loss_low:+.3f}, {row.loss_high:+.3f}] "
                     f"| accuracy {row.accuracy_verdict}; loss {row.loss_verdict} |")
    return "\n".join(lines) + "\n"


def shown(run_dir: str) -> str:
    """A run directory as the record names it: relative to the repository, else its name alone (no machine
    path is recorded)."""
    path = Path(run_dir).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--reference", default="benchmarks/results/sweep_addition_5seeds/seeds.csv")
    parser.add_argument("--method", default="activation_aware")
    args = parser.parse_args(argv)
    reference = pd.read_csv(ROOT / args.reference)
    reference = reference[reference["emulator.method"] == args.method]
    bf16 = pd.concat([run_rows(Path(d)) for d in args.runs], ignore_index=True)
    table = compare(bf16, reference)
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    io.write_json(RESULTS / "accuracy.json", {"reference": args.reference, "method": args.method,
                                              "seeds": sorted(int(s) for s in bf16["seed"].unique()),
                                              "rows": table.to_dict(orient="records")})
    (RESULTS / "accuracy.md").write_text(markdown(table), encoding="utf-8")
    record = provenance.record(
        {"bf16-mixed": {"preset": "standard", "lora": {"precision": "bf16-mixed"}},
         "32-true": {"preset": "standard"}},
        command="python benchmarks/precision_accuracy.py --runs " + " ".join(shown(d) for d in args.runs))
    provenance.write([RESULTS / "accuracy.json", RESULTS / "accuracy.md"], record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
