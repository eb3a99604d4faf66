import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")
# the thread count a test trains with does not follow the machine's momentary load (results stay comparable)
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import pytest
import torch

from emloc.models import load_tokenizer, tiny_llama


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture
def tiny_model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a model folder (with the default tokenizer), for Run/CLI tests."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_run_config(model_dir, **overrides):
    from emloc.config import RunConfig, merge_dicts
    base = {
        "model": str(model_dir), "device": "cpu",
        "data": {"n_train": 32, "n_calibration": 8, "n_test": 6, "max_length": 96},
        "lora": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "learning_rate": 5e-3},
        "evaluation": {"max_new_tokens": 3, "batch_size": 8},
    }
    return RunConfig.from_dict(merge_dicts(base, overrides))


def random_factors(out_features, in_features, rank, generator):
    return torch.randn(out_features, rank, generator=generator, dtype=torch.float64), \
        torch.randn(rank, in_features, generator=generator, dtype=torch.float64)


def assert_reproduces_inside_subspace(emulated: dict, corrected: dict, names, rows: int = 5) -> None:
    """For each module in ``names``: on inputs in the row space of the emulator adapter's ``A``, the corrected
    adapter's layer on the original gives the fine-tuned emulator's output (``emulated``/``corrected``:
    :func:`emloc.correction.lora_layers` of each model)."""
    for name in names:
        A = emulated[name].lora_A["default"].weight.double()
        x = (torch.randn(rows, A.shape[0], dtype=torch.float64) @ A).float()
        with torch.no_grad():
            expected, actual = emulated[name](x).double(), corrected[name](x).double()
        assert torch.allclose(actual, expected, rtol=1e-3, atol=1e-4 * expected.abs().max()), name
