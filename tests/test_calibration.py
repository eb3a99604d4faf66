"""Calibration statistics: hooks, shared inputs, padding."""
import pytest
import torch

from emloc.calibration import collect_statistics, recording_inputs, target_linears
from emloc.config import LLAMA_PROJECTIONS
from emloc.errors import EmlocError


def features(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 1000, (length - i % 3,), generator=g).tolist()} for i in range(n)]


def test_shared_inputs_are_grouped(tiny_model):
    stats = collect_statistics(tiny_model, features(4, 10), LLAMA_PROJECTIONS, pad_token_id=2, progress=False)
    layer = "model.layers.0"
    assert stats.input_of[f"{layer}.self_attn.k_proj"] == f"{layer}.self_attn.q_proj"
    assert stats.input_of[f"{layer}.self_attn.v_proj"] == f"{layer}.self_attn.q_proj"
    assert stats.input_of[f"{layer}.mlp.up_proj"] == f"{layer}.mlp.gate_proj"
    assert stats.input_of[f"{layer}.self_attn.o_proj"] == f"{layer}.self_attn.o_proj"
    assert len(stats.covariances) == 4 * 2  # q-group, o, gate-group, down per layer
    assert stats.C(f"{layer}.mlp.down_proj").shape == (128, 128)


def test_C_is_sum_of_outer_products_over_real_tokens(tiny_model):
    feats = features(3, 9)
    stats = collect_statistics(tiny_model, feats, LLAMA_PROJECTIONS, pad_token_id=2, batch_size=3, progress=False)
    # the same statistics one unpadded sample at a time
    single = collect_statistics(tiny_model, feats, LLAMA_PROJECTIONS, pad_token_id=2, batch_size=1, progress=False)
    name = "model.layers.1.mlp.gate_proj"
    assert torch.allclose(stats.covariances[name], single.covariances[name], rtol=1e-4, atol=1e-4)
    assert stats.token_counts[name] == sum(len(f["input_ids"]) for f in feats)
    captured = []
    module = dict(tiny_model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for f in feats:
            tiny_model(input_ids=torch.tensor([f["input_ids"]]))
    handle.remove()
    X = torch.cat(captured).double()
    assert torch.allclose(stats.covariances[name].double(), X.T @ X, rtol=1e-4, atol=1e-3)


def test_hooks_are_removed_even_after_an_error(tiny_model):
    modules = target_linears(tiny_model, LLAMA_PROJECTIONS)
    with pytest.raises(RuntimeError):
        with recording_inputs(modules, torch.device("cpu")):
            assert all(len(m._forward_pre_hooks) == 1 for m in modules.values())
            raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in modules.values())


def test_unknown_target_pattern_is_a_clear_error(tiny_model):
    with pytest.raises(EmlocError, match="matches no linear layer"):
        target_linears(tiny_model, ["q_proj", "qkv_proj"])
