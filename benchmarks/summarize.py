"""The suite's measured targets (speed, memory, accuracy, the class start) from the stored benchmark results -> claims.csv / claims.md.

    python benchmarks/summarize.py
"""
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from bench_memory import median_step_seconds  # noqa: E402
from common import RESULTS  # noqa: E402

from emloc import provenance  # noqa: E402
from emloc.baselines import is_structured  # noqa: E402


NOTE = ("`low`/`high`: the 95% seed-level interval (Student-t over seeds, differences paired by seed) where the claim "
        "has one; `verdict` reads it against the target (`undecided` when it spans the target), else the measured value. "
        "`measured under`: the settings of the claim's source (its provenance record).")


def _json(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


HEADLINE_SWEEP = "sweep_addition_5seeds"
"""The sweep the accuracy, loss and baseline claims are read from: today's defaults, 5 seeds (issue 24)."""

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


def _transfer_claims(path: Path, column: str, what: str, detail,
                     bounds: tuple[str, str] = ("ci_low", "ci_high")) -> list[dict]:
    """Per emulator method, one claim row read from a sweep table at the base point."""
    if not path.exists():
        return []
    table, rows = _at_base_point(pd.read_csv(path)), []
    for method in table["emulator.method"].unique():
        row = table[(table["emulator.method"] == method) & (table["variant"] == _transfer_variant(method))]
        if len(row):
            row = row.iloc[0]
            rows.append({"claim": f"{method}: transfer closes >= 80% of the zero-shot -> LoRA {what} gap (ratio 0.5)",
                         "measured": row[column], "low": row.get(bounds[0], float("nan")),
                         "high": row.get(bounds[1], float("nan")), "target": 0.8, "direction": ">=",
                         "detail": detail(row), "source": path.parent.name, "seed_statistic": True})
    return rows


def gap_claims(sweep: Path) -> list[dict]:
    """The share of the zero-shot -> LoRA accuracy gap closed by the transfer, with its seed-level interval."""
    return _transfer_claims(sweep / "gap.csv", "gap_closed", "accuracy", lambda row: (
        f"{row['seeds']} seeds, {row['variant']}, task addition" + (f"; {row['reason']}" if not row.get("defined", True) else "")))


def loss_claims(sweep: Path) -> list[dict]:
    """The same share on the mean response-token loss (an interval only where per-seed losses are stored)."""
    return _transfer_claims(sweep / "loss.csv", "loss_gap_closed", "*loss*", lambda row: (
        f"response-token loss {row['loss']:.3f}, {row['seeds']} seeds, {row['variant']}"
        + ("" if "gap_low" in row else "; no interval: per-seed losses were not stored")),
        bounds=("gap_low", "gap_high"))


def baseline_claims(sweep: Path) -> list[dict]:
    """EMLoC's transfer against each baseline's at ratio 0.5: the paired difference per seed and its verdict."""
    path = sweep / "baselines.csv"
    if not path.exists():
        return []
    table = _at_base_point(pd.read_csv(path))
    return [{"claim": f"EMLoC's transfer beats {row['method']}'s on accuracy (ratio 0.5, paired by seed)",
             "measured": row["difference"], "low": row["ci_low"], "high": row["ci_high"], "target": 0.0,
             "direction": ">", "detail": row["sentence"], "source": sweep.name, "seed_statistic": True}
            for _, row in table[table["metric"] == "accuracy"].iterrows()]


SCHEDULE_POINT = {"emulator.ratio": 0.5, "lora.steps": 300, "correction.method": "official",
                  "emulator.calibration": "independent", "data.n_calibration": 64}
"""The paper's schedule (issue 24, part c) at ratio 0.5 under today's defaults, in ``schedule/``."""


def schedule_claims(folder: Path) -> list[dict]:
    """Per task, the share of the accuracy and of the loss gap the corrected transfer closes after 300 steps
    (``benchmarks/schedule_tables.py``; the source named is the sweep that measured it)."""
    rows = []
    for name, column, bounds, what in (("gap.csv", "gap_closed", ("ci_low", "ci_high"), "accuracy"),
                                       ("loss.csv", "loss_gap_closed", ("gap_low", "gap_high"), "*loss*")):
        if not (folder / name).exists():
            continue
        table = pd.read_csv(folder / name)
        for axis, value in SCHEDULE_POINT.items():
            table = table[table[axis] == value]
        for _, row in table[table["variant"] == "transfer_corrected"].iterrows():
            why = "" if row.get("defined", row.get("gap_defined", True)) else f"; {row['reason']}"
            rows.append({"claim": f"activation_aware: transfer closes >= 80% of the zero-shot -> LoRA {what} gap "
                                  f"(ratio 0.5, 300 steps, task {row['task']})",
                         "measured": row[column], "low": row[bounds[0]], "high": row[bounds[1]], "target": 0.8,
                         "direction": ">=", "detail": f"{row['seeds']} seeds, transfer_corrected{why}",
                         "source": f"schedule_{row['task']}", "seed_statistic": True})
    return rows


def _meets(value: float, target: float, direction: str) -> bool:
    return {">": value > target, ">=": value >= target, "<=": value <= target}[direction]


def verdict(measured: float, low: float, high: float, target: float, direction: str, seed_statistic) -> str:
    """``held`` / ``not held`` from the interval when there is one (``held``: its worst end meets the target;
    ``not held``: not even its best end does; else ``undecided``); a statistic over seeds without one is
    ``undecided``; a single measurement (speed, memory) is read from its value."""
    if pd.notna(low) and pd.notna(high):
        worst, best = (low, high) if direction.startswith(">") else (high, low)
        if _meets(worst, target, direction):
            return "held"
        return "undecided: the interval spans the target" if _meets(best, target, direction) else "not held"
    if seed_statistic is True:
        return "undecided: no interval (per-seed values not stored)"
    if pd.isna(measured):
        return "undefined"
    return "held" if _meets(measured, target, direction) else "not held"


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



def big_step_claim(big_step: dict) -> dict:
    """The step-time target where the weights dominate (``bench_memory.py --big --big-timing``)."""
    return {"claim": f"emulator LoRA step time <= 0.6x the original's (1.5B {big_step['dtype']}, ratio "
                     f"{big_step['ratio']:g}, checkpointing on)",
            "measured": big_step["step_time_emulator_over_original"], "target": 0.6, "direction": "<=",
            "detail": f"median step {median_step_seconds(big_step, 'big_step_emulator'):.1f} s vs "
                      f"{median_step_seconds(big_step, 'big_step_original'):.1f} s over {big_step['rounds']} rounds (each a fresh "
                      f"process, {big_step['timed_steps']} timed steps); per round "
                      + ", ".join(f"{r:.2f}x" for r in big_step["step_time_emulator_over_original_per_round"])
                      + f"; batch {big_step['batch_size']}, {big_step['threads']} thread", "source": "big_step_time.json"}


def step_scaling_claim(scaling: dict, shape: str = "8b") -> dict:
    """The step-time target at the widest decoder shape of ``bench_step_scaling.py`` (Llama-3-8B's), with the
    other shapes' extrapolations and the full-depth checks in the detail."""
    widest = scaling["shapes"][shape]
    others = "; ".join(
        f"{s['label']} {s['ratio_full_depth']:.2f}x"
        + (f" (measured at full depth {s['measured_full_depth']['ratio']:.2f}x)" if "measured_full_depth" in s else "")
        for name, s in scaling["shapes"].items() if name != shape)
    return {"claim": f"emulator LoRA step time <= 0.6x the original's ({widest['label']} decoder shape, {widest['depth']} "
                     f"layers, {scaling['dtype']}, ratio {scaling['ratio']:g}, checkpointing on)",
            "measured": widest["ratio_full_depth"], "target": 0.6, "direction": "<=",
            "detail": f"extrapolated from random-weight stacks of {', '.join(map(str, scaling['layers'][shape]))} "
                      f"layers: {widest['emulator']['full_depth_s']:.1f} s vs {widest['original']['full_depth_s']:.1f} s "
                      f"per step; per round " + ", ".join(f"{r:.2f}x" for r in widest["ratio_full_depth_per_round"])
                      + f"; per layer {widest['ratio_per_layer']:.2f}x; other shapes: {others}; "
                      f"{scaling['threads']} thread", "source": "step_scaling.json"}


def readme_command_rows(readme: dict) -> list[dict]:
    """The claims measured by ``bench_readme_commands.py``: the README's commands, from outside."""
    commands = readme["rows"]
    train, inference = commands["train_emulator"], commands["inference_original"]
    repeats = len(train["repeats"])

    def claim(text: str, ratio: str, target: float, detail: str) -> dict:
        return {"claim": text, "measured": readme[ratio], "target": target, "direction": "<=", "detail": detail,
                "source": "readme_commands.json"}

    rows = [claim("peak memory of `emloc train --on emulator` (default flags) <= inference with the original",
                  "lora_emulator_over_inference_original", 1.0,
                  f"bench_readme_commands.py: {train['peak_rss_mb']:.0f} MB vs {inference['peak_rss_mb']:.0f} MB, "
                  f"peak RSS from outside, median of {repeats}; standard preset, float32")]
    if "lora_emulator_over_generation_only" in readme:
        generation = commands["inference_original_generate_only"]
        rows.append(claim("peak memory of `emloc train --on emulator` (default flags) <= generation alone with the "
                          "original", "lora_emulator_over_generation_only", 1.0,
                          f"{train['peak_rss_mb']:.0f} MB vs {generation['peak_rss_mb']:.0f} MB (16 greedy tokens for "
                          f"8 prompts, no whole-batch forward), from outside, median of {repeats}"))
    rows.append(claim("step time of `emloc train --on emulator` <= 0.6x `--on original` (default flags, ratio 0.5)",
                      "step_time_emulator_over_original", 0.6,
                      f"{train['seconds_per_step']:.2f} s vs {commands['train_original']['seconds_per_step']:.2f} s "
                      f"per step, the runs' own, {readme['steps']} steps, median of {repeats}"))
    if "budget_step_time_over_default" in readme:
        budget = commands["train_emulator_budget"]
        beside = commands["train_emulator_budget_beside_a_neighbour"]
        rows.append(claim("`--memory-budget inference`: step time <= 1.5x the default path's",
                          "budget_step_time_over_default", 1.5,
                          f"{budget['seconds_per_step']:.2f} s vs {train['seconds_per_step']:.2f} s per step, one "
                          f"benchmark run; peak {readme['budget_over_inference_original']:.2f}x inference"))
        rows.append(claim("`--memory-budget inference` beside a second such training: step <= 2x idle",
                          "budget_step_time_beside_a_neighbour_over_idle", 2.0,
                          f"{beside['seconds_per_step']:.2f} s vs {budget['seconds_per_step']:.2f} s per step "
                          f"(2 cores)"))
    return rows

def claims(results: Path = RESULTS) -> pd.DataFrame:
    rows = []
    construction, step, memory = _json("construction.json"), _json("training_step_ratio0.5.json"), _json("memory.json")
    if construction:
        rows.append({"claim": "construction >= 3x faster than the official algorithm (same statistics)",
                     "measured": construction["speedup_pure"], "target": 3.0, "direction": ">=",
                     "detail": f"factors only; with spectra + report (`emloc build`): {construction['speedup_build_factors']:.2f}x", "source": "construction.json"})
    if memory and "step_time_emulator_over_original" in memory:
        rows.append({"claim": "emulator LoRA step time <= 0.6x the original's (ratio 0.5, checkpointing on)",
                     "measured": memory["step_time_emulator_over_original"], "target": 0.6, "direction": "<=",
                     "detail": _step_detail(memory, step), "source": "memory.json"})
    elif step:
        rows.append({"claim": "emulator step time <= 0.6x the original's (ratio 0.5)",
                     "measured": step["emulator_over_original"], "target": 0.6, "direction": "<=",
                     "detail": f"{step['emulator_s_per_step']:.3f} s vs {step['original_s_per_step']:.3f} s per step, batch {step['batch_size']}", "source": "training_step_ratio0.5.json"})
    readme = _json("readme_commands.json")
    if readme:
        rows += readme_command_rows(readme)
    if memory:
        rows.append({"claim": "peak memory of LoRA on the emulator <= inference with the original (default model)",
                     "measured": memory["lora_emulator_over_inference_original"], "target": 1.0, "direction": "<=",
                     "detail": f"float32, checkpointing on; LoRA emulator / LoRA original = {memory['lora_emulator_over_lora_original']:.2f}", "source": "memory.json"})
    for name in big_result_files():
        memory_big = _json(name)
        rows.append({"claim": f"peak memory of LoRA on the emulator <= inference with the original "
                              f"({memory_big['parameters'] / 1e9:.2f}B {memory_big['dtype']}, weights dominate)",
                     "measured": memory_big["lora_emulator_over_inference_original"], "target": 1.0, "direction": "<=",
                     "detail": _big_detail(memory_big), "source": name})
        if "train_command_over_inference_original" in memory_big:
            command = next(r for r in memory_big["stages"] if r["stage"] == "big_train_command")
            rows.append({"claim": f"peak memory of `emloc train --on emulator` (default flags) <= inference with the "
                                  f"original ({memory_big['parameters'] / 1e9:.2f}B {memory_big['dtype']})",
                         "measured": memory_big["train_command_over_inference_original"], "target": 1.0,
                         "direction": "<=", "detail": f"{command['peak_rss_mb']:.0f} MB from outside vs inference "
                         f"once loaded; whole process against whole process "
                         f"{memory_big['train_command_over_inference_original_whole_process']:.2f}x", "source": name})
    big_step = _json("big_step_time.json")
    if big_step:
        rows.append(big_step_claim(big_step))
    scaling = _json("step_scaling.json")
    if scaling and "8b" in scaling["shapes"]:
        rows.append(step_scaling_claim(scaling))
    class_start = _json("class_start.json")
    if class_start:
        rows.append({"claim": "a fresh clone with a prepared class bundle reaches the quickstart's results board in <= 60 s",
                     "measured": class_start["clone_to_board_s"], "target": float(class_start["target_s"]),
                     "direction": "<=", "detail": _class_detail(class_start), "source": "class_start.json"})
    sweep = results / HEADLINE_SWEEP
    rows += gap_claims(sweep) + loss_claims(sweep) + baseline_claims(sweep) + schedule_claims(results / "schedule")
    table = pd.DataFrame(rows)
    if len(table):
        for column in ("low", "high", "seed_statistic"):
            table[column] = table[column] if column in table else float("nan")
        table["verdict"] = [verdict(*row) for row in table[["measured", "low", "high", "target", "direction", "seed_statistic"]].itertuples(index=False)]
        table["held"] = table["verdict"] == "held"
        table["measured under"] = [provenance.measured_under(provenance.read(results / source)) for source in table["source"]]
    return table.drop(columns=["source", "seed_statistic"])


def main() -> None:
    table = claims()
    table.to_csv(RESULTS / "claims.csv", index=False)
    (RESULTS / "claims.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n\n" + NOTE + "\n", encoding="utf-8")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
