"""The suite's measured targets (speed, memory, accuracy, the class start) from the stored benchmark results -> claims.csv / claims.md.

    python benchmarks/summarize.py
"""
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402

from emloc.baselines import is_structured  # noqa: E402


def _json(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


BASE_POINT = {"emulator.ratio": 0.5, "data.n_calibration": 64, "correction.clamp": 3.0}
"""The sweep point the accuracy target is read at: ratio 0.5 and the standard preset's other settings."""


def _at_base_point(table: pd.DataFrame) -> pd.DataFrame:
    for axis, value in BASE_POINT.items():
        if axis in table:
            table = table[table[axis] == value]
    return table


def _transfer_variant(method: str) -> str:
    """Corrected transfer for SVD emulators; the structured baselines have no ``W'`` to correct."""
    return "transfer_uncorrected" if is_structured(method) else "transfer_corrected"


def _transfer_claims(path: Path, column: str, what: str, detail) -> list[dict]:
    """Per emulator method, one claim row read from a sweep table at the base point."""
    if not path.exists():
        return []
    table, rows = _at_base_point(pd.read_csv(path)), []
    for method in table["emulator.method"].unique():
        row = table[(table["emulator.method"] == method) & (table["variant"] == _transfer_variant(method))]
        if len(row):
            rows.append({"claim": f"{method}: transfer closes >= 80% of the zero-shot -> LoRA {what} gap (ratio 0.5)",
                         "measured": row.iloc[0][column], "target": 0.8, "direction": ">=", "detail": detail(row.iloc[0])})
    return rows


def gap_claims(sweep: Path) -> list[dict]:
    """The share of the zero-shot -> LoRA accuracy gap closed by the transfer, with its interval."""
    return _transfer_claims(sweep / "gap.csv", "gap_closed", "accuracy", lambda row: (
        f"95% CI [{row['ci_low']:.2f}, {row['ci_high']:.2f}], {row['seeds']} seeds x 100 items, {row['variant']}, task addition"))


def loss_claims(sweep: Path) -> list[dict]:
    """The same share on the mean response-token loss (no interval: only seed means are stored)."""
    return _transfer_claims(sweep / "loss.csv", "loss_gap_closed", "*loss*", lambda row: (
        f"response-token loss {row['loss']:.3f}, {row['seeds']} seeds, {row['variant']}; no interval"))


def _step_detail(memory: dict, step: dict | None) -> str:
    times = {r["stage"]: r["s_per_step"] for r in memory["timing"]}
    detail = (f"{times['step_emulator']:.2f} s vs {times['step_original']:.2f} s per step (bench_memory.py, same run, "
              f"the pipeline's training)")
    if "step_time_emulator_over_original_no_checkpointing" in memory:
        detail += f"; without checkpointing {memory['step_time_emulator_over_original_no_checkpointing']:.2f}x"
    if step:
        detail += f"; bench_training_step.py {step['emulator_over_original']:.2f}x"
    return detail


def _big_detail(memory_big: dict) -> str:
    rows = {r["stage"]: r for r in memory_big["stages"]}
    lora, inference = rows["big_lora_emulator"], rows["big_inference_original"]
    return (f"{memory_big['dtype']}, batch {memory_big['batch_size']}, peak once loaded: {lora['running_peak_mb']:.0f} MB "
            f"vs {inference['running_peak_mb']:.0f} MB; whole process (loader transient included) "
            f"{memory_big['lora_emulator_over_inference_original_whole_process']:.2f}x")


def _class_detail(class_start: dict) -> str:
    runs = class_start.get("bundle_runs", [])
    preset = (f"{len(runs)} runs of {runs[0]['lora_steps']} LoRA steps (seeds {', '.join(str(r['seed']) for r in runs)}), "
              if runs else "")
    return (f"bench_class_start.py: {preset}bundle {class_start['bundle_mb']:.0f} MB; clone {class_start['clone_s']:.1f} s, "
            f"unpack {class_start['unpack_s']:.1f} s, notebook 00 to the board {class_start['notebook_to_board_s']:.1f} s; "
            f"{class_start['cpu_threads']} CPU threads")


def big_result_files(results: Path = RESULTS) -> list[str]:
    """The 1.5B memory results, one file per dtype (``bench_memory.py --big``): float32 first."""
    return sorted(path.name for path in results.glob("memory_big*.json"))


def claims(results: Path = RESULTS) -> pd.DataFrame:
    rows = []
    construction, step, memory = _json("construction.json"), _json("training_step_ratio0.5.json"), _json("memory.json")
    if construction:
        rows.append({"claim": "construction >= 3x faster than the official algorithm (same statistics)",
                     "measured": construction["speedup_pure"], "target": 3.0, "direction": ">=",
                     "detail": f"factors only; with spectra + report (`emloc build`): {construction['speedup_build_factors']:.2f}x"})
    if memory and "step_time_emulator_over_original" in memory:
        rows.append({"claim": "emulator LoRA step time <= 0.6x the original's (ratio 0.5, checkpointing on)",
                     "measured": memory["step_time_emulator_over_original"], "target": 0.6, "direction": "<=",
                     "detail": _step_detail(memory, step)})
    elif step:
        rows.append({"claim": "emulator step time <= 0.6x the original's (ratio 0.5)",
                     "measured": step["emulator_over_original"], "target": 0.6, "direction": "<=",
                     "detail": f"{step['emulator_s_per_step']:.3f} s vs {step['original_s_per_step']:.3f} s per step, batch {step['batch_size']}"})
    if memory:
        rows.append({"claim": "peak memory of LoRA on the emulator <= inference with the original (default model)",
                     "measured": memory["lora_emulator_over_inference_original"], "target": 1.0, "direction": "<=",
                     "detail": f"float32, checkpointing on; LoRA emulator / LoRA original = {memory['lora_emulator_over_lora_original']:.2f}"})
    for memory_big in map(_json, big_result_files()):
        rows.append({"claim": f"peak memory of LoRA on the emulator <= inference with the original "
                              f"({memory_big['parameters'] / 1e9:.2f}B {memory_big['dtype']}, weights dominate)",
                     "measured": memory_big["lora_emulator_over_inference_original"], "target": 1.0, "direction": "<=",
                     "detail": _big_detail(memory_big)})
    class_start = _json("class_start.json")
    if class_start:
        rows.append({"claim": "a fresh clone with a prepared class bundle reaches the quickstart's results board in <= 60 s",
                     "measured": class_start["clone_to_board_s"], "target": float(class_start["target_s"]),
                     "direction": "<=", "detail": _class_detail(class_start)})
    rows += gap_claims(results / "sweep_addition") + loss_claims(results / "sweep_addition")
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
