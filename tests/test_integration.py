"""`emloc run --preset quick` on the real default model (SmolLM2-135M-Instruct), through the console script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emloc.pipeline import VARIANTS


@pytest.mark.integration
def test_quick_run_on_the_default_model(tmp_path):
    out = tmp_path / "quick"
    emloc = Path(sys.executable).parent / "emloc"
    command = [str(emloc)] if emloc.exists() else [sys.executable, "-m", "emloc"]
    done = subprocess.run([*command, "run", "--out", str(out), "--preset", "quick", "--device", "cpu"],
                          capture_output=True, text=True, timeout=2400, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "transfer_corrected" in done.stdout and "Traceback" not in done.stderr
    results = json.loads((out / "results.json").read_text())
    variants = results["variants"]
    assert set(variants) == set(VARIANTS)
    assert all(v["n"] == 32 for v in variants.values())
    # a real pretrained model learns the answer format: LoRA lowers the response loss a lot
    assert variants["full_lora"]["loss"] < 0.6 * variants["zero_shot"]["loss"]
    assert variants["emulator_lora"]["loss"] < 0.6 * variants["zero_shot"]["loss"]
    assert results["parameters"]["emulator"] < 0.75 * results["parameters"]["original"]
    build = json.loads((out / "manifests" / "build.json").read_text())
    assert build["params_original"] > 130e6
