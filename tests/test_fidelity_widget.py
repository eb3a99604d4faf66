"""Headless tests of the fidelity view and of the error map's allocation controls (tiny Llama, no run directory)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")

import numpy as np
import pytest
import torch

import widgets
from emloc import fidelity
from emloc.calibration import collect_statistics
from emloc.config import LLAMA_PROJECTIONS, EmulatorConfig
from emloc.svd_emulator import build_factors, emulate
from emloc.models import tiny_llama


def tokens(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 1000, (length,), generator=g).tolist()} for _ in range(n)]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=0, num_layers=3)
    stats = collect_statistics(model, tokens(8, 16, 0), LLAMA_PROJECTIONS, pad_token_id=2, progress=False)
    uniform = build_factors(model, stats, EmulatorConfig(ratio=0.4), progress=False)
    glob = build_factors(model, stats, EmulatorConfig(ratio=0.4, allocation="global"), progress=False)
    held_out = tokens(4, 12, 1)
    report = fidelity.fidelity_report(model, emulate(model, uniform), held_out, 2, progress=False)
    exact = fidelity.fidelity_report(model, model, held_out, 2, progress=False)
    return uniform, glob, report, exact


def ydata(trace):
    return np.asarray(trace.y, dtype=float)


def shown(view):
    (output,) = view.output.outputs
    return output["data"]["application/vnd.plotly.v1+json"]


def test_fidelity_view_plots_drift_next_to_calibration_error(setup):
    uniform, _, report, exact = setup
    view = widgets.fidelity_view(report, uniform.report)
    drift = fidelity.drift_table(report)["relative_error"].to_numpy()
    np.testing.assert_allclose(ydata(view.trace("drift")), drift)
    assert list(view.trace("drift").x) == [0, 1, 2]
    mean = uniform.report.groupby("layer")["calibration_error"].mean().to_numpy()
    np.testing.assert_allclose(ydata(view.trace("calibration mean")), mean)
    assert np.all(ydata(view.trace("calibration max")) >= mean)
    assert f"mean {report['kl']['all']['mean']:.4f}" in view.stats.value

    view.type_dropdown.value = "v_proj"
    np.testing.assert_allclose(ydata(view.trace("calibration mean")),
                               uniform.report.query("type == 'v_proj'")["calibration_error"].to_numpy())
    np.testing.assert_allclose(ydata(view.trace("drift")), drift)          # drift does not depend on the menu
    assert "(v_proj)" in shown(view)["layout"]["title"]["text"]
    view.scale.value = "log"
    assert shown(view)["layout"]["yaxis"]["type"] == "log"

    figure = view.figure
    view.set_fidelity(exact)                                                 # updated in place
    assert view.figure is figure
    np.testing.assert_allclose(ydata(view.trace("drift")), 0, atol=1e-7)
    assert "same top-1 next token 100.0%" in view.stats.value


def test_error_map_shows_the_global_allocation(setup):
    uniform, glob, _, _ = setup
    view = widgets.error_map(glob)
    assert view.allocation_dropdown.value == "global"                        # a global build opens on its ranks
    table = view.table().set_index("module")
    report = glob.report.set_index("module")
    assert (table.loc[report.index, "rank"] == report["rank"]).all()
    assert (table.loc[report.index, "rank_uniform"] == report["rank_uniform"]).all()
    z_error = np.asarray(view.trace("error").z, dtype=float)
    column = list(view.trace("error").x).index("v_proj")
    assert z_error[1, column] == pytest.approx(report.loc["model.layers.1.self_attn.v_proj", "whitened_error_at_rank"],
                                               rel=1e-5)
    assert view.trace("error").zmax == pytest.approx(np.nanmax(z_error))  # the colour range follows the data (NaN: the dense last down_proj)

    view.show_dropdown.value = "rank"
    z_rank = np.asarray(view.trace("error").z, dtype=float)
    assert z_rank[1, column] == report.loc["model.layers.1.self_attn.v_proj", "rank"]
    view.show_dropdown.value = "rank_change"
    change = np.asarray(view.trace("error").z, dtype=float)
    assert np.any(change != 0) and view.trace("error").zmin == -view.trace("error").zmax
    assert "rank change vs uniform" in shown(view)["layout"]["title"]["text"]
    assert shown(view)["layout"]["annotations"][0]["text"] == "rank change vs uniform per module"

    global_table = view.table()
    view.allocation_dropdown.value = "uniform"                                # same budget, uniform ranks
    assert np.all(np.nan_to_num(np.asarray(view.trace("error").z, dtype=float)) == 0)  # NaN: the dense cell
    assert (view.table()["error"] ** 2).sum() >= (global_table["error"] ** 2).sum() - 1e-12
    assert view.table()["params_after"].sum() >= global_table["params_after"].sum()

    view.allocation_dropdown.value = "global"
    view.ratio_slider.value = 0.2                                             # the allocation follows the slider
    low = view.table()
    assert (low["rank"] != low["rank_uniform"]).any()
    assert (low["params_after"].sum() <= widgets.error_map(uniform, 0.2).table()["params_after"].sum())


def test_error_map_of_a_uniform_build_starts_uniform(setup):
    uniform, _, _, _ = setup
    view = widgets.error_map(uniform)
    assert view.allocation_dropdown.value == "uniform" and view.show_dropdown.value == "error"
    view.show_dropdown.value = "rank"
    z_rank = np.asarray(view.trace("error").z, dtype=float)
    report = uniform.report.set_index("module")
    assert z_rank[0, 0] == report.loc["model.layers.0.self_attn.q_proj", "rank"]
