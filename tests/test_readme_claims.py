"""The README's first page quotes the measured memory headline: it must say what the result files say."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def first_page() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## ", 1)[0]  # everything before the first section


def peaks(memory: dict, inference: str, lora: str) -> tuple[float, float]:
    """Peak MB of two stages: once the model is loaded where that was measured, else the whole process."""
    rows = {r["stage"]: r.get("running_peak_mb", r["peak_rss_mb"]) for r in memory["stages"]}
    return rows[inference], rows[lora]


def test_readme_quotes_the_default_model_measurement():
    memory = json.loads((RESULTS / "memory.json").read_text())
    inference, lora = peaks(memory, "inference_original", "lora_emulator")
    text = first_page()
    assert f"{lora / inference:.2f}x" in text and f"{lora:.0f} MB against {inference:.0f} MB" in text
    assert f"{memory['step_time_emulator_over_original']:.2f}x" in text


@pytest.mark.parametrize("result_file", ["memory_big.json", "memory_big_bfloat16.json"])
def test_readme_quotes_the_weights_dominated_measurement(result_file):
    big = json.loads((RESULTS / result_file).read_text())
    inference, lora = peaks(big, "big_inference_original", "big_lora_emulator")
    text = first_page()
    assert f"{lora / inference:.2f}x" in text and f"{lora:.0f} MB against {inference:.0f} MB" in text
    assert f"{big['parameters'] / 1e9:.1f}B" in text and big["dtype"] in text


def test_readme_quotes_the_default_command_measured_from_outside():
    """The first figure is the one a user reproduces with the README's own commands."""
    measured = json.loads((RESULTS / "readme_commands.json").read_text())
    lora = measured["rows"]["train_emulator"]["peak_rss_mb"]
    inference = measured["rows"]["inference_original"]["peak_rss_mb"]
    text = first_page()
    assert f"**{lora / inference:.2f}x**" in text and f"{lora:.0f} MB against {inference:.0f} MB" in text
    assert f"{measured['step_time_emulator_over_original']:.2f}x the original's" in text
    assert ("not yet" in text) == (lora > inference)  # the sentence says whether it fits
    assert f"bring it to {measured['budget_over_inference_original']:.2f}x" in text
    generation = measured["rows"]["inference_original_generate_only"]["peak_rss_mb"]
    assert f"**{lora / generation:.2f}x** the leanest inference, generation alone ({generation:.0f} MB)" in text
    assert f"at {measured['budget_step_time_over_default']:.2f}x the default step time" in text


def test_readme_quotes_the_weights_dominated_step_time():
    big = json.loads((RESULTS / "big_step_time.json").read_text())
    text = first_page()
    assert f"**{big['step_time_emulator_over_original']:.2f}x**" in text and f"{big['rounds']} rounds" in text
    assert ("still missed" in text) == (big["step_time_emulator_over_original"] > 0.6)


def test_readme_quotes_the_step_time_at_the_papers_width():
    shapes = json.loads((RESULTS / "step_scaling.json").read_text())["shapes"]
    ratio = shapes["8b"]["ratio_full_depth"]
    text = first_page()
    assert shapes["8b"]["label"] in text and f"**{ratio:.2f}x** the original's" in text
    assert ("the target holds there" in text) == (ratio <= 0.6)
