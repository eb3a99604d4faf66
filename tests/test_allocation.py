"""Rank allocation: the global rule stays within the uniform rule's budget and never has a larger summed error."""
import math

import pytest
import torch

from emloc import allocation
from emloc.calibration import collect_statistics
from emloc.config import LLAMA_PROJECTIONS, EmulatorConfig, RunConfig
from emloc.svd_emulator import build_factors
from emloc.errors import EmlocError
from emloc.lowrank import break_even_rank

# SmolLM2-135M's projection shapes (out, in), and a decay rate per type: v decays slowly, q/k fast (issue 12)
SMOL = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
        "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
DECAY = {"q_proj": 0.05, "k_proj": 0.06, "v_proj": 0.01, "o_proj": 0.02, "gate_proj": 0.015, "up_proj": 0.012,
         "down_proj": 0.02}


def random_problem(seed, n_modules=12):
    g = torch.Generator().manual_seed(seed)
    shapes, spectra = {}, {}
    for m in range(n_modules):
        out, inn = (int(x) for x in torch.randint(8, 96, (2,), generator=g))
        shapes[f"model.layers.{m}.mlp.p{m}"] = (out, inn)
        decay = float(torch.rand(1, generator=g)) * 0.5
        scale = float(torch.rand(1, generator=g)) * 1e3
        n = min(out, inn)
        spectra[f"model.layers.{m}.mlp.p{m}"] = scale * torch.exp(-decay * torch.arange(n, dtype=torch.float64)) \
            * (1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64))
    return spectra, shapes


def smol_problem(seed, n_layers=4):
    g = torch.Generator().manual_seed(seed)
    shapes, spectra = {}, {}
    for layer in range(n_layers):
        for kind, (out, inn) in SMOL.items():
            name = f"model.layers.{layer}.{'mlp' if kind in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{kind}"
            i = torch.arange(min(out, inn), dtype=torch.float64)
            noise = torch.rand(len(i), generator=g, dtype=torch.float64)
            shapes[name] = (out, inn)
            spectra[name] = (10.0 ** float(torch.randn(1, generator=g))) * torch.exp(-DECAY[kind] * i) * (1 + 0.2 * noise)
    return spectra, shapes


def check(spectra, shapes, rho):
    uniform = allocation.uniform_ranks(shapes, rho)
    budget = allocation.parameter_count(shapes, uniform)
    ranks = allocation.global_ranks(spectra, shapes, budget)
    assert set(ranks) == set(shapes)
    assert allocation.parameter_count(shapes, ranks) <= budget
    assert all(1 <= ranks[n] <= break_even_rank(*shapes[n]) for n in shapes)
    assert allocation.allocation_error(spectra, ranks) <= allocation.allocation_error(spectra, uniform) + 1e-12
    return uniform, ranks, budget


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5, 0.8])
def test_global_within_budget_and_no_worse_than_uniform_on_random_spectra(seed, rho):
    check(*random_problem(seed), rho)


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
def test_global_beats_uniform_on_real_shaped_spectra(rho):
    spectra, shapes = smol_problem(seed=1)
    uniform, ranks, budget = check(spectra, shapes, rho)
    # different decays make uniform clearly suboptimal; the greedy spends nearly all of the budget
    assert allocation.allocation_error(spectra, ranks) < 0.9 * allocation.allocation_error(spectra, uniform)
    assert budget - allocation.parameter_count(shapes, ranks) < max(o + i for o, i in shapes.values())
    assert any(ranks[n] > uniform[n] for n in shapes if n.endswith("v_proj"))


def test_identical_modules_get_the_uniform_ranks():
    sigma_sq = torch.exp(-0.1 * torch.arange(48, dtype=torch.float64))
    shapes = {f"model.layers.{m}.self_attn.q_proj": (48, 64) for m in range(5)}
    spectra = {n: sigma_sq.clone() for n in shapes}
    for rho in (0.2, 0.5, 0.9):
        uniform, ranks, _ = check(spectra, shapes, rho)
        assert all(abs(ranks[n] - uniform[n]) <= 1 for n in shapes)


def test_caps_at_break_even_and_keeps_rank_one():
    # one module with a flat spectrum would take everything; it stops at the break-even rank
    shapes = {"model.layers.0.mlp.flat": (40, 60), "model.layers.0.mlp.steep": (40, 60)}
    spectra = {"model.layers.0.mlp.flat": torch.ones(40, dtype=torch.float64),
               "model.layers.0.mlp.steep": torch.tensor([1.0] + [1e-12] * 39, dtype=torch.float64)}
    ranks = allocation.global_ranks(spectra, shapes, budget=100 * (24 + 6))
    assert ranks["model.layers.0.mlp.flat"] == math.floor(break_even_rank(40, 60)) == 24
    assert ranks["model.layers.0.mlp.steep"] == 6   # the rest of the budget, though its gains are tiny
    with pytest.raises(EmlocError, match="raise emulator.ratio"):
        allocation.global_ranks(spectra, shapes, budget=150)


def test_weights_shift_the_budget():
    spectra, shapes = random_problem(3, n_modules=4)
    uniform = allocation.uniform_ranks(shapes, 0.4)
    budget = allocation.parameter_count(shapes, uniform)
    first = next(iter(shapes))
    heavy = {n: (100.0 if n == first else 1.0) for n in shapes}
    assert allocation.global_ranks(spectra, shapes, budget, weights=heavy)[first] >= \
        allocation.global_ranks(spectra, shapes, budget)[first]


def test_uniform_ranks_follow_ratio_patterns():
    shapes = {"model.layers.0.mlp.down_proj": (64, 128), "model.layers.0.self_attn.q_proj": (64, 64)}
    ranks = allocation.uniform_ranks(shapes, 0.5, {r".*mlp.*": 0.25})
    assert ranks == {"model.layers.0.mlp.down_proj": math.floor(0.25 * 64 * 128 / 192),
                     "model.layers.0.self_attn.q_proj": 16}


def stats_for(model):
    torch.manual_seed(0)
    feats = [{"input_ids": torch.randint(3, 1000, (16,)).tolist()} for _ in range(8)]
    return collect_statistics(model, feats, LLAMA_PROJECTIONS, pad_token_id=2, progress=False)


def test_spectra_match_the_build(tiny_model):
    stats = stats_for(tiny_model)
    spectra_sq, shapes = allocation.whitened_spectra_sq(tiny_model, stats, EmulatorConfig(), progress=False)
    factors = build_factors(tiny_model, stats, EmulatorConfig(ratio=0.5), progress=False)
    for name, sigma_sq in spectra_sq.items():
        assert shapes[name] == tuple(dict(tiny_model.named_modules())[name].weight.shape)
        sigma = factors.spectra[name]["whitened"].double()
        torch.testing.assert_close(sigma_sq, sigma.pow(2), rtol=1e-4, atol=1e-6 * float(sigma[0] ** 2))


def test_global_build_reports_both_ranks_and_lowers_the_summed_error(tiny_model):
    stats = stats_for(tiny_model)
    uniform = build_factors(tiny_model, stats, EmulatorConfig(ratio=0.5), progress=False)
    glob = build_factors(tiny_model, stats, EmulatorConfig(ratio=0.5, allocation="global"), progress=False)
    assert "rank_uniform" not in uniform.report.columns         # uniform runs keep their report format
    assert (glob.report["rank_uniform"] == uniform.report["rank"]).all()
    assert glob.report["params_after"].sum() <= uniform.report["params_after"].sum()
    assert (glob.report["whitened_error_at_rank"] ** 2).sum() <= (uniform.report["whitened_error_at_rank"] ** 2).sum()
    assert (glob.report["rank"] != uniform.report["rank"]).any()
    for name in glob.u:
        assert glob.u[name].shape[1] == glob.report.set_index("module").loc[name, "rank"]
    # explicit ranks equal to the uniform rule reproduce the uniform build bit for bit
    explicit = build_factors(tiny_model, stats, EmulatorConfig(ratio=0.5), progress=False,
                             ranks=dict(zip(uniform.report["module"], uniform.report["rank"])))
    assert all(torch.equal(explicit.u[n], uniform.u[n]) and torch.equal(explicit.v[n], uniform.v[n]) for n in uniform.u)


def test_allocation_at_ratio_from_cached_spectra(tiny_model):
    stats = stats_for(tiny_model)
    glob = build_factors(tiny_model, stats, EmulatorConfig(ratio=0.5, allocation="global"), progress=False)
    table = allocation.allocation_at_ratio(glob.report, glob.spectra, 0.5)
    assert list(table["rank_global"]) == list(glob.report["rank"])
    assert list(table["rank_uniform"]) == list(glob.report["rank_uniform"])
    assert (table["error_global"] ** 2).sum() <= (table["error_uniform"] ** 2).sum() + 1e-12


def test_config_validates_allocation(tiny_model):
    assert RunConfig.from_dict({"emulator": {"allocation": "global"}}).emulator.allocation == "global"
    with pytest.raises(EmlocError, match="emulator.allocation"):
        RunConfig.from_dict({"emulator": {"allocation": "greedy"}})
    stats = stats_for(tiny_model)
    with pytest.raises(EmlocError, match="rank 0 .* is outside"):
        build_factors(tiny_model, stats, EmulatorConfig(), progress=False, ranks={n: 0 for n in stats.input_of})
