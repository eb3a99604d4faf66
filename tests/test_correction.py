"""LoRA correction invariants: pure functions and the adapter on a tiny model."""
import pytest
import torch
from peft import PeftModel

from conftest import assert_reproduces_inside_subspace
from emloc.calibration import collect_statistics
from emloc.config import EmulatorConfig, LLAMA_PROJECTIONS, LoraConfigSpec
from emloc.correction import clamp_columns, correct_adapter, correct_lora_pair, lora_layers, reclamp_report
from emloc.svd_emulator import build_factors, emulate
from emloc.lora import add_lora, lora_scaling
from emloc.models import tiny_llama


def random_pair(out_features=12, in_features=20, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    W = rand(out_features, in_features)
    u, v = rand(out_features, 3), rand(3, in_features)
    return W, u @ v, rand(r, in_features), rand(out_features, r) * 0.1


@pytest.mark.parametrize("alpha,use_rslora", [(4, False), (16, False), (32, False), (16, True)])
def test_unclamped_correction_reproduces_the_emulator_inside_the_adapter_subspace(alpha, use_rslora):
    W, W_emulated, A, B = random_pair()
    s = lora_scaling(alpha, A.shape[0], use_rslora)
    pair = correct_lora_pair(A, B, W, W_emulated, s, lam=None)
    x = A.T @ torch.randn(A.shape[0], 7, dtype=torch.float64)  # inputs in the span of A^T
    original_corrected = (W + s * pair.B @ pair.A) @ x
    emulator_finetuned = (W_emulated + s * B @ A) @ x
    assert torch.allclose(original_corrected, emulator_finetuned, atol=1e-10)
    # and without correction they differ by the mismatch
    assert not torch.allclose((W + s * B @ A) @ x, emulator_finetuned, atol=1e-3)
    # the corrected adapter keeps the rank and an orthonormal A'
    assert pair.A.shape == A.shape and pair.B.shape == B.shape
    assert torch.allclose(pair.A @ pair.A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=1e-10)


def test_correction_leaves_the_update_alone_when_there_is_no_mismatch():
    W, _, A, B = random_pair()
    pair = correct_lora_pair(A, B, W, W, s=2.0, lam=3.0)
    assert torch.allclose(pair.B @ pair.A, B @ A, atol=1e-10)
    assert not pair.clamped.any()


def test_clamp_caps_each_column_ratio_at_lambda():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(10, 6, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1, 5, 10, 50, 0.01], dtype=torch.float64)
    B_tilde = torch.randn(10, 6, generator=g, dtype=torch.float64)
    for lam in (1.0, 3.0, 10.0):
        D_clamped, clamped = clamp_columns(D, B_tilde, lam)
        ratio_before = D.abs().mean(0) / B_tilde.abs().mean(0)
        ratio_after = D_clamped.abs().mean(0) / B_tilde.abs().mean(0)
        assert torch.equal(clamped, ratio_before > lam)
        assert torch.all(ratio_after <= lam + 1e-9)
        assert torch.allclose(D_clamped[:, ~clamped], D[:, ~clamped])
    assert torch.equal(clamp_columns(D, B_tilde, None)[0], D)


@pytest.fixture(scope="module")
def corrected_setup(tmp_path_factory):
    """A tiny model, its emulator, a (randomised) LoRA adapter on the emulator, and its correction."""
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    feats = [{"input_ids": torch.randint(3, 1000, (12,)).tolist()} for _ in range(6)]
    stats = collect_statistics(model, feats, LLAMA_PROJECTIONS, pad_token_id=2, progress=False)
    # every LoRA module compressed, so each one has a mismatch to correct
    factors = build_factors(model, stats, EmulatorConfig(ratio=0.5, skip_last_down_proj=False), progress=False)
    spec = LoraConfigSpec(r=4, alpha=16)
    emulator_lora = add_lora(emulate(model, factors), spec, LLAMA_PROJECTIONS, seed=0)
    for layer in lora_layers(emulator_lora).values():  # stand-in for training: non-zero B
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    emulator_dir = tmp_path_factory.mktemp("emulator_lora")
    emulator_lora.save_pretrained(emulator_dir)
    on_original = PeftModel.from_pretrained(tiny_llama(seed=0), str(emulator_dir))
    report, tensors = correct_adapter(on_original, factors, lam=None)
    corrected_dir = tmp_path_factory.mktemp("corrected")
    on_original.save_pretrained(corrected_dir)
    return model, factors, emulator_lora, corrected_dir, report, tensors


def test_corrected_adapter_reproduces_the_emulator_per_module(corrected_setup):
    model, factors, emulator_lora, corrected_dir, report, _ = corrected_setup
    corrected = PeftModel.from_pretrained(tiny_llama(seed=0), str(corrected_dir))
    emu_layers, cor_layers = lora_layers(emulator_lora), lora_layers(corrected)
    assert set(emu_layers) == set(cor_layers) == set(factors.u)
    assert_reproduces_inside_subspace(emu_layers, cor_layers, emu_layers)
    assert (report["misalignment_after"] < 1e-5).all()
    assert (report["misalignment_before"] > 1e-3).all()


def test_saved_adapter_loads_with_plain_peft_and_merged_equals_unmerged(corrected_setup):
    *_, corrected_dir, _, _ = corrected_setup
    peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), str(corrected_dir))
    ids = torch.randint(3, 1000, (2, 11))
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert not torch.allclose(base, unmerged, atol=1e-4)


def test_reclamp_report_matches_a_fresh_correction(corrected_setup):
    model, factors, emulator_lora, corrected_dir, report, tensors = corrected_setup
    same = reclamp_report(tensors, report, None)
    assert same["misalignment_after"].max() < 1e-5
    tight = reclamp_report(tensors, report, 1e-3)
    assert (tight["clamped_columns"] > 0).any()
    assert tight["misalignment_after"].sum() > same["misalignment_after"].sum()
