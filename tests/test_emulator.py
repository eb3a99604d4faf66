"""The emulator keeps names and shapes; LoRA on it has the original model's keys and shapes."""
import torch
from peft import get_peft_model_state_dict

from emloc.calibration import collect_statistics
from emloc.config import EmulatorConfig, LLAMA_PROJECTIONS, LoraConfigSpec
from emloc.svd_emulator import EmulatorFactors, LowRankLinear, build_factors, count_parameters, emulate
from emloc.families import last_block_output
from emloc.targets import excluded_modules, ratio_for
from emloc.lora import add_lora
from emloc.models import tiny_llama


def stats_for(model):
    feats = [{"input_ids": torch.randint(3, 1000, (10,)).tolist()} for _ in range(4)]
    return collect_statistics(model, feats, LLAMA_PROJECTIONS, pad_token_id=2, progress=False)


def test_emulator_swaps_every_target_and_keeps_shapes(tiny_model):
    factors = build_factors(tiny_model, stats_for(tiny_model), EmulatorConfig(ratio=0.5, skip_last_down_proj=False),
                            progress=False)
    emulator = emulate(tiny_model, factors)
    original_modules = dict(tiny_model.named_modules())
    swapped = {n: m for n, m in emulator.named_modules() if isinstance(m, LowRankLinear)}
    assert set(swapped) == set(factors.u) and len(swapped) == 7 * 2
    for name, module in swapped.items():
        assert (module.in_features, module.out_features) == (original_modules[name].in_features, original_modules[name].out_features)
        assert module.rank == factors.report.set_index("module").loc[name, "rank"]
    assert count_parameters(emulator) < count_parameters(tiny_model)
    assert not any(isinstance(m, LowRankLinear) for m in tiny_model.modules())  # input untouched


def test_full_rank_emulator_reproduces_the_model(tiny_model):
    u, v = {}, {}
    for name, module in tiny_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in LLAMA_PROJECTIONS:
            U, S, Vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
            u[name], v[name] = (U * S).float(), Vh.float()
    emulator = emulate(tiny_model, EmulatorFactors(u, v, {}, None, "plain"))
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad():
        assert torch.allclose(emulator(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-4)


def test_lora_on_emulator_has_the_original_models_keys_and_shapes(tiny_model):
    factors = build_factors(tiny_model, stats_for(tiny_model), EmulatorConfig(ratio=0.3), progress=False)
    spec = LoraConfigSpec(r=4)
    on_emulator = get_peft_model_state_dict(add_lora(emulate(tiny_model, factors), spec, LLAMA_PROJECTIONS, seed=0))
    on_original = get_peft_model_state_dict(add_lora(tiny_llama(seed=0), spec, LLAMA_PROJECTIONS, seed=0))
    assert on_emulator.keys() == on_original.keys()
    assert all(on_emulator[k].shape == on_original[k].shape for k in on_original)


def test_ratio_patterns_override_per_module(tiny_model):
    config = EmulatorConfig(ratio=0.5, ratio_patterns={r".*mlp.*": 0.2})
    assert ratio_for("model.layers.0.mlp.down_proj", config) == 0.2
    assert ratio_for("model.layers.0.self_attn.q_proj", config) == 0.5
    factors = build_factors(tiny_model, stats_for(tiny_model), config, progress=False)
    report = factors.report.set_index("module")
    assert report.loc["model.layers.0.mlp.down_proj", "ratio"] == 0.2
    assert (report["params_after"] < report["params_before"]).all()
    assert (report["rank"] < report["break_even_rank"]).all()


def test_activation_aware_error_is_at_most_plain_on_calibration_stats(tiny_model):
    stats = stats_for(tiny_model)
    aware = build_factors(tiny_model, stats, EmulatorConfig(ratio=0.4), progress=False).report
    plain = build_factors(tiny_model, stats, EmulatorConfig(ratio=0.4, method="plain"), progress=False).report
    assert (aware["calibration_error"].values <= plain["calibration_error"].values + 1e-6).all()
    assert aware["calibration_error"].mean() < plain["calibration_error"].mean()


def test_the_last_down_projection_stays_dense_by_default(tiny_model):
    """The official configuration: every decoder linear but the last layer's MLP down projection is compressed."""
    last = "model.layers.1.mlp.down_proj"
    factors = build_factors(tiny_model, stats_for(tiny_model), EmulatorConfig(ratio=0.5), progress=False)
    assert last not in factors.u and last not in set(factors.report["module"]) and last not in factors.spectra
    assert "model.layers.0.mlp.down_proj" in factors.u and len(factors.u) == 7 * 2 - 1
    emulator = emulate(tiny_model, factors)
    kept = emulator.get_submodule(last)
    assert type(kept) is torch.nn.Linear and torch.equal(kept.weight, tiny_model.get_submodule(last).weight)
    names = [*factors.u, last]
    assert excluded_modules(names, EmulatorConfig(), last_block_output(tiny_model)) == {last}
    assert excluded_modules(names, EmulatorConfig(), None) == {last}  # no decoder known: the highest layer index
    assert excluded_modules(names, EmulatorConfig(skip_last_down_proj=False), last_block_output(tiny_model)) == set()
