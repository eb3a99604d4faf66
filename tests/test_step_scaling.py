"""The step-time scaling benchmark (issue 21): the per-layer fit and its full-depth extrapolation, and the
emulator stacks it times (the build's own choice of factored linears, at the build's ranks)."""
import sys
from pathlib import Path

import pytest
import torch

from emloc.config import EmulatorConfig
from emloc.lowrank import rank_from_ratio
from emloc.svd_emulator import LowRankLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_step_scaling  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def test_fit_line_recovers_intercept_and_slope():
    a, b = bench_step_scaling.fit_line([1, 2, 3, 1, 2, 3], [0.5 + 2.0 * k for k in (1, 2, 3, 1, 2, 3)])
    assert a == pytest.approx(0.5) and b == pytest.approx(2.0)
    with pytest.raises(ValueError, match="two distinct"):
        bench_step_scaling.fit_line([2, 2], [1.0, 1.1])


def test_full_depth_extrapolates_each_model_and_each_round():
    line = {"original": (0.4, 1.0), "emulator": (0.3, 0.5)}
    rows = [{"model": model, "layers": k, "round": rnd, "s_per_step": a + b * k + (0.01 if rnd else 0.0)}
            for model, (a, b) in line.items() for k in (1, 2, 3) for rnd in (0, 1)]
    result = bench_step_scaling.full_depth(rows, depth=32)
    assert result["original"]["full_depth_s"] == pytest.approx(0.405 + 32.0)
    assert result["ratio_per_layer"] == pytest.approx(0.5)
    assert result["ratio_full_depth"] == pytest.approx((0.305 + 16.0) / (0.405 + 32.0))
    assert result["ratio_full_depth_per_round"] == pytest.approx([(0.3 + 16) / (0.4 + 32), (0.31 + 16) / (0.41 + 32)])


def test_emulator_stack_factors_what_the_build_factors():
    config = EmulatorConfig()
    original = bench_step_scaling.stack(TINY, 2, "original", config)
    emulator = bench_step_scaling.stack(TINY, 2, "emulator", config)
    low_rank = {name: m for name, m in emulator.named_modules() if isinstance(m, LowRankLinear)}
    assert len(low_rank) == 2 * 7 - 1  # every decoder linear but the last layer's MLP output (official)
    assert isinstance(emulator.get_submodule("model.layers.1.mlp.down_proj"), torch.nn.Linear)
    for name, module in low_rank.items():
        dense = original.get_submodule(name)
        assert module.rank == rank_from_ratio(config.ratio, *dense.weight.shape)
        assert float(module.dense_weight().detach().std()) == pytest.approx(float(dense.weight.detach().std()),
                                                                    rel=0.5)
    assert not any(isinstance(m, LowRankLinear) for m in original.modules())
