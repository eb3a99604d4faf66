"""End-to-end fidelity: KL of next-token distributions and residual-stream drift, original vs emulator."""
import copy

import numpy as np
import pytest
import torch

from emloc import fidelity
from emloc.calibration import collect_statistics
from emloc.config import LLAMA_PROJECTIONS, EmulatorConfig, RunConfig
from emloc.data import IGNORE_INDEX
from emloc.svd_emulator import build_factors, emulate
from emloc.errors import EmlocError
from emloc.models import tiny_llama
from emloc.rundir import RunDir, save_fidelity


def features(n=6, seed=0, labelled=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = 8 + k % 4                      # ragged: padding must be left out
        ids = torch.randint(3, 1000, (length,), generator=g).tolist()
        feature = {"input_ids": ids}
        if labelled:                            # the last 3 tokens are the response
            feature["labels"] = [IGNORE_INDEX] * (length - 3) + ids[-3:]
        out.append(feature)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def stats(model):
    feats = [{"input_ids": torch.randint(3, 1000, (16,), generator=torch.Generator().manual_seed(s)).tolist()}
             for s in range(12)]     # 192 tokens > every input width, so C is full rank
    return collect_statistics(model, feats, LLAMA_PROJECTIONS, pad_token_id=2, progress=False)


def test_a_model_against_itself_has_zero_kl_and_zero_drift(model):
    report = fidelity.fidelity_report(model, copy.deepcopy(model), features(), pad_token_id=2, batch_size=4,
                                      progress=False)
    assert report["kl"]["all"]["mean"] == pytest.approx(0, abs=1e-7)
    assert report["kl"]["all"]["top1_agreement"] == 1.0
    drift = fidelity.drift_table(report)
    assert list(drift.index) == [0, 1]
    np.testing.assert_allclose(drift["relative_error"], 0, atol=1e-7)
    assert (drift["hidden_norm"] > 0).all()


def test_positions_count_every_predicted_token_once(model):
    feats = features()
    kl = fidelity.next_token_kl(model, model, feats, pad_token_id=2, batch_size=4, progress=False)
    assert kl["all"]["tokens"] == sum(len(f["input_ids"]) - 1 for f in feats)    # last token predicts nothing
    assert kl["response"]["tokens"] == 3 * len(feats)
    assert kl["prompt"]["tokens"] + kl["response"]["tokens"] == kl["all"]["tokens"]
    unlabelled = fidelity.next_token_kl(model, model, features(labelled=False), 2, progress=False)
    assert unlabelled["response"]["tokens"] == 0 and unlabelled["response"]["mean"] is None


def test_kl_and_drift_are_positive_for_a_compressed_emulator_and_do_not_depend_on_batching(model, stats):
    emulator = emulate(model, build_factors(model, stats, EmulatorConfig(ratio=0.3), progress=False))
    one = fidelity.fidelity_report(model, emulator, features(), pad_token_id=2, batch_size=1, progress=False)
    four = fidelity.fidelity_report(model, emulator, features(), pad_token_id=2, batch_size=4, progress=False)
    for kind in fidelity.POSITIONS:
        assert one["kl"][kind]["mean"] > 0 and one["kl"][kind]["median"] >= 0
        assert one["kl"][kind]["p90"] >= one["kl"][kind]["median"]
        assert four["kl"][kind]["mean"] == pytest.approx(one["kl"][kind]["mean"], rel=1e-4)
    drift = fidelity.drift_table(one)["relative_error"]
    assert (drift > 0).all()
    np.testing.assert_allclose(fidelity.drift_table(four)["relative_error"], drift, rtol=1e-4)
    # the single-purpose functions agree with the combined report
    kl = fidelity.next_token_kl(model, emulator, features(), 2, batch_size=4, progress=False)
    assert kl["all"]["mean"] == pytest.approx(four["kl"]["all"]["mean"], rel=1e-6)
    table = fidelity.residual_drift(model, emulator, features(), 2, batch_size=4, progress=False)
    np.testing.assert_allclose(table["relative_error"], fidelity.drift_table(four)["relative_error"], rtol=1e-9)


def test_full_rank_emulator_has_no_drift(model, stats):
    linears = {n: m for n, m in model.named_modules() if n in stats.input_of}
    ranks = {n: min(m.weight.shape) for n, m in linears.items()}
    emulator = emulate(model, build_factors(model, stats, EmulatorConfig(), progress=False, ranks=ranks))
    report = fidelity.fidelity_report(model, emulator, features(), pad_token_id=2, progress=False)
    assert (fidelity.drift_table(report)["relative_error"] < 1e-4).all()
    assert report["kl"]["all"]["mean"] < 1e-6


def test_a_perturbation_in_layer_k_drifts_from_layer_k_on():
    model = tiny_llama(seed=0, num_layers=4)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[2].mlp.down_proj.weight.add_(0.05 * torch.randn_like(perturbed.model.layers[2].mlp.down_proj.weight))
    drift = fidelity.residual_drift(model, perturbed, features(), pad_token_id=2, progress=False)["relative_error"]
    assert list(drift[:2]) == [0.0, 0.0]
    assert (drift[2:] > 1e-4).all()


def test_fidelity_by_layer_and_round_trip(model, stats, tmp_path):
    factors = build_factors(model, stats, EmulatorConfig(ratio=0.5), progress=False)
    report = fidelity.fidelity_report(model, emulate(model, factors), features(), 2, progress=False)
    run = RunDir(tmp_path / "run", RunConfig())
    save_fidelity(run, report, 0.0)
    assert run.fidelity() == report
    table = fidelity.fidelity_by_layer(report, factors.report)
    assert list(table.columns) == ["drift", "calibration_error_mean", "calibration_error_max"]
    assert table.loc[1, "calibration_error_mean"] == pytest.approx(
        factors.report.query("layer == 1")["calibration_error"].mean())
    assert (table["calibration_error_max"] >= table["calibration_error_mean"]).all()
    only_v = fidelity.fidelity_by_layer(report, factors.report, "v_proj")
    assert only_v.loc[0, "calibration_error_mean"] == pytest.approx(
        factors.report.query("layer == 0 and type == 'v_proj'")["calibration_error"].iloc[0])
    with pytest.raises(EmlocError, match="no module of type"):
        fidelity.fidelity_by_layer(report, factors.report, "w_proj")
    (run.dir / "fidelity.json").write_text("{}")
    with pytest.raises(EmlocError, match="not a fidelity report"):
        run.fidelity()


def test_bad_inputs(model):
    with pytest.raises(EmlocError, match="no held-out samples"):
        fidelity.next_token_kl(model, model, [], 2, progress=False)
    with pytest.raises(EmlocError, match="decoder layers"):
        fidelity.residual_drift(model, tiny_llama(seed=0, num_layers=3), features(), 2, progress=False)
