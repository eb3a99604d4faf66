"""Correction methods (issue 7): each method's defining property, the diagnostics on constructed cases,
the wiring through a peft adapter, config/CLI, the word task and the bootstrap helper."""
import numpy as np
import pytest
import torch

from emloc.correction import (aligned_mismatch, clamp_columns, activation_aware_mismatch, column_coefficients, column_cosines,
                              CORRECTION_TARGETS, correct_adapter, correct_lora_pair, orthonormal_row_basis,
                              pair_diagnostics, pair_report, reclamp_report)
from emloc.errors import EmlocError
from emloc.lora import lora_scaling

F64 = torch.float64


def _case(seed=0, out=12, inp=16, r=4, gap=0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=F64)
    W_emulated = W + gap * torch.randn(out, inp, generator=g, dtype=F64)
    A = torch.randn(r, inp, generator=g, dtype=F64)
    B = torch.randn(out, r, generator=g, dtype=F64)
    return W, W_emulated, A, B


@pytest.mark.parametrize("alpha,r,rslora", [(16.0, 4, False), (8.0, 4, False), (1.0, 4, False), (16.0, 4, True), (32.0, 4, True)])
def test_official_reproduces_emulator_inside_subspace_unclamped(alpha, r, rslora):
    W, W_emulated, A, B = _case(r=r)
    s = lora_scaling(alpha, r, rslora)
    pair = correct_lora_pair(A, B, W, W_emulated, s, lam=None, method="official")
    x = A.T @ torch.randn(r, 5, dtype=F64)  # inputs in the row space of A
    original_corrected = (W + s * pair.B @ pair.A) @ x
    emulator_tuned = (W_emulated + s * B @ A) @ x
    torch.testing.assert_close(original_corrected, emulator_tuned, rtol=1e-10, atol=1e-10)
    assert torch.equal(pair.D_target, pair.D)  # the official target is the whole mismatch


def test_official_with_clamp_subtracts_the_clamped_mismatch():
    W, W_emulated, A, B = _case(gap=2.0)
    Q = orthonormal_row_basis(A)
    B_tilde, D = B @ (A @ Q), (W - W_emulated) @ Q / 2.0
    fired = []
    for lam in (0.3, 1.0, 3.0, 10.0):
        pair = correct_lora_pair(A, B, W, W_emulated, 2.0, lam)  # the default method is the official one
        applied, clamped = clamp_columns(D, B_tilde, lam)
        torch.testing.assert_close(pair.B, B_tilde - applied, rtol=0, atol=0)
        assert torch.equal(pair.clamped, clamped)
        fired.append(bool(pair.clamped.any()))
    assert fired[0] and not fired[-1]  # the clamp is exercised both ways


def test_one_method_list_for_config_and_correction():
    from emloc.config import CORRECTION_METHODS
    assert tuple(CORRECTION_TARGETS) == CORRECTION_METHODS
    W, W_emulated, A, B = _case()
    C = torch.eye(16, dtype=F64)
    columns = {m: list(pair_report(correct_lora_pair(A, B, W, W_emulated, 2.0, 3.0, m, C), W_emulated, 2.0))
               for m in CORRECTION_METHODS}
    assert all(c == columns["official"] for c in columns.values())  # one report for every method


def test_aligned_never_moves_a_column_orthogonal_to_the_mismatch():
    W, W_emulated, A, B = _case()
    s = 2.0
    Q = orthonormal_row_basis(A)
    D = (W - W_emulated) @ Q / s
    # make column 0 of B~ orthogonal to D_0 and column 1 exactly along D_1 by choosing B~, then B = B~ Q^T A^+
    B_tilde = B @ (A @ Q)
    d0 = D[:, 0] / D[:, 0].norm()
    B_tilde[:, 0] -= (B_tilde[:, 0] @ d0) * d0
    B_tilde[:, 1] = 0.4 * D[:, 1]
    B_new = B_tilde @ Q.T @ torch.linalg.pinv(A)
    pair = correct_lora_pair(A, B_new, W, W_emulated, s, lam=None, method="aligned")
    torch.testing.assert_close(pair.B_tilde, B_tilde, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pair.B[:, 0], pair.B_tilde[:, 0], rtol=0, atol=1e-12)  # orthogonal: untouched
    torch.testing.assert_close(pair.B[:, 1], pair.B_tilde[:, 1] - 0.4 * D[:, 1], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(pair.B[:, 1], pair.B_tilde[:, 1])


def test_aligned_coefficients_are_clipped_to_zero_one():
    g = torch.Generator().manual_seed(3)
    D = torch.randn(10, 4, generator=g, dtype=F64)
    B_tilde = torch.stack([-2 * D[:, 0], 3 * D[:, 1], 0.5 * D[:, 2], torch.zeros(10, dtype=F64)], 1)
    applied = aligned_mismatch(D, B_tilde)
    torch.testing.assert_close(applied, torch.stack([0 * D[:, 0], D[:, 1], 0.5 * D[:, 2], 0 * D[:, 3]], 1))


def test_activation_aware_minimises_the_calibration_objective():
    W, W_emulated, A, B = _case(seed=5)
    s = 1.7
    g = torch.Generator().manual_seed(9)
    mixing = torch.randn(16, 16, generator=g, dtype=F64)
    X = mixing @ torch.randn(16, 200, generator=g, dtype=F64)  # correlated activations
    Q = orthonormal_row_basis(A)
    delta = activation_aware_mismatch(W, W_emulated, Q, X @ X.T, s)
    # brute force: min over Delta of ||(W - W') X - s Delta Q^T X||_F by least squares on the explicit X
    brute = torch.linalg.lstsq((Q.T @ X).T, ((W - W_emulated) @ X).T).solution.T / s
    torch.testing.assert_close(delta, brute, rtol=1e-8, atol=1e-10)
    pair = correct_lora_pair(A, B, W, W_emulated, s, None, "activation_aware", X @ X.T)
    objective = lambda Bh: float((((W + s * Bh @ pair.A) - (W_emulated + s * B @ A)) @ X).norm())
    best = objective(pair.B)
    official = correct_lora_pair(A, B, W, W_emulated, s, None)
    assert best < objective(official.B)
    for _ in range(5):  # any perturbation is worse
        assert best <= objective(pair.B + 1e-3 * torch.randn(pair.B.shape, generator=g, dtype=F64))


def test_activation_aware_with_identity_statistics_is_the_official_correction():
    W, W_emulated, A, B = _case(seed=2)
    a = correct_lora_pair(A, B, W, W_emulated, 2.0, None, "activation_aware", torch.eye(16, dtype=F64) * 7.0)
    b = correct_lora_pair(A, B, W, W_emulated, 2.0, None)
    torch.testing.assert_close(a.B, b.B, rtol=1e-10, atol=1e-10)


def test_activation_aware_needs_statistics_and_unknown_method_fails():
    W, W_emulated, A, B = _case()
    with pytest.raises(EmlocError, match="calibration"):
        correct_lora_pair(A, B, W, W_emulated, 2.0, None, "activation_aware", None)
    with pytest.raises(EmlocError, match="unknown"):
        correct_lora_pair(A, B, W, W_emulated, 2.0, None, "magic")


def test_diagnostics_on_constructed_cases():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(8, 3, generator=g, dtype=F64)
    exact = pair_diagnostics(D.clone(), D, D, D, s=2.0)  # B~ = D: the adapter compensated all of it
    assert exact["update_mismatch_cosine"] == pytest.approx(1.0)
    assert exact["update_mismatch_coefficient"] == pytest.approx(1.0)
    assert exact["column_coefficient_mean"] == pytest.approx(1.0)
    assert exact["clamp_shift_max"] == pytest.approx(0.0)
    assert exact["mismatch_norm"] == pytest.approx(2.0 * float(D.norm()))
    half = pair_diagnostics(-0.5 * D, D, D, 0.25 * D, s=1.0)
    assert half["update_mismatch_cosine"] == pytest.approx(-1.0)
    assert half["update_mismatch_coefficient"] == pytest.approx(-0.5)
    assert half["clamp_shift_mean"] == pytest.approx(0.75)
    orthogonal = torch.stack([D[:, 1] - (D[:, 1] @ D[:, 0]) / (D[:, 0] @ D[:, 0]) * D[:, 0]], 1)
    assert float(column_cosines(orthogonal, D[:, :1])) == pytest.approx(0.0, abs=1e-12)
    assert float(column_coefficients(D[:, :1] * 0, torch.zeros(8, 1, dtype=F64))) == 0.0


# ---- wiring through peft on a tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run():
    from emloc.calibration import collect_statistics
    from emloc.config import EmulatorConfig, LoraConfigSpec
    from emloc.svd_emulator import build_factors, emulate
    from emloc.lora import add_lora
    from emloc.models import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=128)
    features = [{"input_ids": torch.randint(3, 128, (12,)).tolist()} for _ in range(6)]
    targets = ["q_proj", "o_proj", "down_proj"]
    stats = collect_statistics(model, features, targets, pad_token_id=2, progress=False)
    factors = build_factors(model, stats, EmulatorConfig(ratio=0.4, target_modules=targets), progress=False)
    peft_model = add_lora(emulate(model, factors), LoraConfigSpec(r=4, alpha=8.0), targets, seed=0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    state = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    return model, factors, stats, state, targets


def _adapter_on_original(tiny_run):
    from emloc.config import LoraConfigSpec
    from emloc.lora import add_lora
    from emloc.models import tiny_llama
    model, factors, stats, state, targets = tiny_run
    peft_model = add_lora(tiny_llama(vocab_size=128), LoraConfigSpec(r=4, alpha=8.0), targets, seed=0)
    peft_model.load_state_dict(state, strict=False)
    return peft_model


@pytest.mark.parametrize("method", ["official", "aligned", "activation_aware"])
def test_correct_adapter_reports_diagnostics_for_each_method(tiny_run, method):
    _, factors, stats, _, _ = tiny_run
    report, tensors = correct_adapter(_adapter_on_original(tiny_run), factors, 3.0, method=method, stats=stats)
    for column in ("method", "mismatch_norm", "update_mismatch_cosine", "update_mismatch_coefficient",
                   "column_coefficient_mean", "clamp_shift_mean", "target_norm", "misalignment_after"):
        assert column in report.columns
    assert (report["method"] == method).all()
    assert report["update_mismatch_cosine"].between(-1 - 1e-9, 1 + 1e-9).all()
    name = report["module"].iloc[0]
    assert {f"{name}.{k}" for k in ("Q", "B_tilde", "D", "D_target", "coefficient", "cosine")} <= set(tensors)
    again = reclamp_report(tensors, report, 3.0)  # the teaching helper's lambda slider
    np.testing.assert_allclose(again["correction_norm"], report["correction_norm"], rtol=1e-5)


def test_official_method_matches_the_default_correction(tiny_run):
    _, factors, stats, _, _ = tiny_run
    a, b = _adapter_on_original(tiny_run), _adapter_on_original(tiny_run)
    correct_adapter(a, factors, 3.0)
    correct_adapter(b, factors, 3.0, method="official", stats=stats)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_activation_aware_adapter_without_stats_is_an_error(tiny_run):
    _, factors, _, _, _ = tiny_run
    with pytest.raises(EmlocError, match="calibrat"):
        correct_adapter(_adapter_on_original(tiny_run), factors, 3.0, method="activation_aware")


# ---- config / CLI / data / stats -----------------------------------------------------------------

def test_config_and_cli_select_the_method(tmp_path):
    from emloc.cli import config_from_args, parser
    from emloc.config import RunConfig
    assert RunConfig().correction.method == "official"
    assert RunConfig.from_dict({"correction": {"method": "aligned"}}).correction.method == "aligned"
    with pytest.raises(EmlocError, match="correction.method"):
        RunConfig.from_dict({"correction": {"method": "best"}})
    args = parser().parse_args(["correct", "--out", str(tmp_path), "--correction-method", "activation_aware"])
    assert config_from_args(args).correction.method == "activation_aware"


def test_wordfacts_task_is_seeded_disjoint_and_checks_the_first_word():
    from emloc.data import make_task_data
    a, b = make_task_data("wordfacts", 300, 16, 50, seed=1), make_task_data("wordfacts", 300, 16, 50, seed=1)
    assert a.test == b.test and len(a.train) == 300
    assert not {e.prompt for e in a.test} & {e.prompt for e in a.train}
    assert all(e.response.isalpha() and e.response.islower() for e in a.train + a.test)
    example = a.test[0]
    assert a.is_correct(example.response.capitalize() + ".\nBecause...", example)
    assert not a.is_correct("The answer is " + example.response, example)


def test_pipeline_correct_stage_uses_the_configured_method(tmp_path):
    """calibrate -> build -> train -> correct on a tiny saved model: the activation-aware method reads the
    stage-1 statistics, writes its method into the manifest and report, and differs from the official one."""
    from emloc import io, pipeline
    from emloc.config import RunConfig
    from emloc.models import load_tokenizer, tiny_llama
    model_dir = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(model_dir)
    load_tokenizer("default").save_pretrained(model_dir)
    base = {"model": str(model_dir), "device": "cpu", "data": {"n_train": 16, "n_calibration": 4, "n_test": 2, "max_length": 64},
            "lora": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "learning_rate": 5e-2},
            "emulator": {"target_modules": ["q_proj", "down_proj"]}}
    run = pipeline.Run(tmp_path / "run", RunConfig.from_dict(base), progress=False)
    pipeline.calibrate(run), pipeline.build(run), pipeline.train(run, "emulator")
    reports = {}
    for method in ("official", "activation_aware"):
        run.config.correction.method = method
        reports[method] = pipeline.correct(run)
        assert io.read_json(run.manifest_path("correct"))["method"] == method
        assert (run.correction_report()["method"] == method).all()
    assert not np.allclose(reports["official"]["correction_norm"], reports["activation_aware"]["correction_norm"])
