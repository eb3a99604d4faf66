"""The analytic memory ledger (meta device) and the lean emulator loader."""
import pytest
import torch

from emloc.calibration import CalibrationStats, target_linears
from emloc.config import LLAMA_PROJECTIONS, EmulatorConfig
from emloc.svd_emulator import build_factors, emulate
from emloc.svd_emulator import load_emulator_lean
from emloc.memory import LedgerSettings, ledger, model_config, parameter_counts
from emloc.models import meta_model
from emloc.models import tiny_llama


def test_paper_like_configs_have_the_expected_size_and_need_no_memory():
    model = meta_model(model_config("llama3-8b"))
    counts = parameter_counts(model, LedgerSettings())
    assert counts["original"] == pytest.approx(8.03e9, rel=0.01)
    assert 0.5 < counts["emulator"] / counts["original"] < 0.6  # embeddings are not compressed
    assert all(p.is_meta for p in model.parameters())


def test_ledger_orders_the_stages_and_sums_its_columns():
    table = ledger(model_config("llama3-8b"), LedgerSettings(batch_size=1, seq_len=256))
    assert table.loc["LoRA (emulator)", "weights"] < table.loc["LoRA (original)", "weights"]
    assert table.loc["LoRA (original)", "total"] > table.loc["inference (original)", "total"]
    parts = table.drop(columns="total").sum(axis=1)
    assert torch.allclose(torch.tensor(parts.values), torch.tensor(table["total"].values))
    longer = ledger(model_config("llama3-8b"), LedgerSettings(batch_size=1, seq_len=512))
    assert longer.loc["LoRA (emulator)", "activations"] == pytest.approx(2 * table.loc["LoRA (emulator)", "activations"])


def test_lean_emulator_equals_the_swapped_emulator(tmp_path):
    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path)
    linears = target_linears(model, LLAMA_PROJECTIONS)
    g = torch.Generator().manual_seed(0)
    covariances = {n: (lambda X: X.T @ X)(torch.randn(80, l.in_features, generator=g)) for n, l in linears.items()}
    stats = CalibrationStats(covariances, {n: n for n in linears}, {n: 80 for n in linears}, 1)
    factors = build_factors(model, stats, EmulatorConfig(ratio=0.4), progress=False)
    tokens = torch.tensor([[1, 4, 6, 8, 9]])
    expected = emulate(model, factors)(input_ids=tokens).logits
    lean = load_emulator_lean(str(tmp_path), factors)
    assert torch.equal(lean(input_ids=tokens).logits, expected)
    assert not any(p.is_meta for p in lean.parameters())


def test_training_on_the_lean_emulator_equals_training_on_the_swapped_one(tmp_path, tiny_model_dir):
    from conftest import tiny_run_config

    from emloc import pipeline
    from emloc.lora import train_lora
    from emloc.pipeline import lean_emulator_for_training
    run = pipeline.Run(tmp_path / "run", tiny_run_config(tiny_model_dir), progress=False)
    pipeline.build(run, pipeline.calibrate(run))
    features, cfg = run.features("train"), run.config
    lean = lean_emulator_for_training(run)
    from emloc.svd_emulator import LowRankLinear
    assert sum(isinstance(m, LowRankLinear) for m in lean.modules()) == 2 * 7 - 1  # every projection but the last down_proj
    histories = [train_lora(model, features, cfg.lora, cfg.emulator.target_modules, run.tokenizer.pad_token_id,
                            seed=0, progress=False).history for model in (lean, run.emulator())]
    assert histories[0] == histories[1] and len(histories[0]) == cfg.lora.steps


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_output_layer_gets_a_contiguous_loss_window(dtype, tolerance):
    """A CPU linear on a strided window is slow (and in bfloat16 materialises the output weight per sequence):
    the output layer gets a contiguous copy, with the same logits to the dtype's rounding."""
    from emloc.models import contiguous_output_layer_input
    model = tiny_llama(dtype=dtype)
    ids = torch.randint(0, 1000, (3, 12))
    with torch.no_grad():
        reference = model(input_ids=ids, logits_to_keep=4).logits.float()
    assert contiguous_output_layer_input(model)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=4).logits.float()
    assert seen == [True]
    torch.testing.assert_close(logits, reference, rtol=tolerance, atol=tolerance)
