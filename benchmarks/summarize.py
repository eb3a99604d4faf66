"""The issue's four targets as measured ratios, from the stored benchmark results -> claims.csv / claims.md.

    python benchmarks/summarize.py
"""
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402


def _json(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def claims(results: Path = RESULTS) -> pd.DataFrame:
    rows = []
    construction, step, memory = _json("construction.json"), _json("training_step_ratio0.5.json"), _json("memory.json")
    if construction:
        rows.append({"claim": "construction >= 3x faster than the official algorithm (same statistics)",
                     "measured": construction["speedup_pure"], "target": 3.0, "direction": ">=",
                     "detail": f"factors only; with spectra + report (`emloc build`): {construction['speedup_build_factors']:.2f}x"})
    if step:
        rows.append({"claim": "emulator step time <= 0.6x the original's (ratio 0.5)",
                     "measured": step["emulator_over_original"], "target": 0.6, "direction": "<=",
                     "detail": f"{step['emulator_s_per_step']:.3f} s vs {step['original_s_per_step']:.3f} s per step, batch {step['batch_size']}"})
    if memory:
        rows.append({"claim": "peak memory of LoRA on the emulator <= inference with the original",
                     "measured": memory["lora_emulator_over_inference_original"], "target": 1.0, "direction": "<=",
                     "detail": f"LoRA emulator / LoRA original = {memory['lora_emulator_over_lora_original']:.2f}"})
    gap_path = results / "sweep_reduced" / "gap.csv"
    if gap_path.exists():
        gap = pd.read_csv(gap_path)
        for method in gap["emulator.method"].unique() if "emulator.method" in gap else []:
            row = gap[(gap["emulator.method"] == method) & (gap["variant"] == ("transfer_corrected" if method in
                      ("activation_aware", "plain") else "transfer_uncorrected"))]
            if len(row):
                row = row.iloc[0]
                rows.append({"claim": f"{method}: transfer closes >= 80% of the zero-shot -> LoRA gap (ratio 0.5)",
                             "measured": row["gap_closed"], "target": 0.8, "direction": ">=",
                             "detail": f"95% CI [{row['ci_low']:.2f}, {row['ci_high']:.2f}], {row['seeds']} seeds, {row['variant']}"})
    loss_path = results / "sweep_reduced" / "loss.csv"
    if loss_path.exists():
        loss = pd.read_csv(loss_path)
        for method in loss["emulator.method"].unique():
            variant = "transfer_corrected" if method in ("activation_aware", "plain") else "transfer_uncorrected"
            row = loss[(loss["emulator.method"] == method) & (loss["variant"] == variant)]
            if len(row):
                row = row.iloc[0]
                rows.append({"claim": f"{method}: transfer closes >= 80% of the zero-shot -> LoRA *loss* gap (ratio 0.5)",
                             "measured": row["loss_gap_closed"], "target": 0.8, "direction": ">=",
                             "detail": f"response-token loss {row['loss']:.3f}, {row['seeds']} seed(s), {variant}; no interval"})
    table = pd.DataFrame(rows)
    if len(table):
        table["held"] = [m >= t if d == ">=" else m <= t for m, t, d in zip(table["measured"], table["target"], table["direction"])]
    return table


def main() -> None:
    table = claims()
    table.to_csv(RESULTS / "claims.csv", index=False)
    (RESULTS / "claims.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n", encoding="utf-8")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
