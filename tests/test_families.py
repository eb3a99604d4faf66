"""Any causal LM: tiny random models of six architectures (built from configs) through every stage with no
configuration, ``Conv1D`` (GPT-2) included."""
import json

import pytest
import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

from conftest import assert_reproduces_inside_subspace
from emloc.calibration import collect_statistics, target_linears
from emloc.cli import main
from emloc.config import EmulatorConfig, LoraConfigSpec
from emloc.correction import correct_adapter, lora_layers
from emloc.errors import EmlocError
from emloc.families import automatic_targets, block_linears, last_block_output, linear_shape, weight_matrix
from emloc.lora import add_lora, load_adapter
from emloc.memory import LedgerSettings, plan_for_budget
from emloc.models import TINY_FAMILIES, tiny_causal_lm
from emloc.svd_emulator import build_factors, emulate
from emloc.targets import AUTO, module_types, targeting_summary

EXPECTED = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "model.layers.1.mlp.down_proj"),
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "model.layers.1.mlp.down_proj"),
    "phi3": (["o_proj", "qkv_proj", "gate_up_proj", "down_proj"], "model.layers.1.mlp.down_proj"),
    "opt": (["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"], "model.decoder.layers.1.fc2"),
    "gpt_neox": (["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                 "gpt_neox.layers.1.mlp.dense_4h_to_h"),
    "gpt2": (["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], "transformer.h.1.mlp.c_proj"),
}


def features(n=6, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 1000, (length,), generator=g).tolist()} for _ in range(n)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_automatic_targets_are_every_block_linear_with_unique_types(family):
    model = tiny_causal_lm(family)
    types, last = EXPECTED[family]
    assert automatic_targets(model) == types
    assert last_block_output(model) == last
    inside = block_linears(model)
    assert set(target_linears(model, [AUTO])) == set(inside)  # the output layer and embeddings stay dense
    assert len(inside) == len(types) * 2 and not any("lm_head" in name or "embed" in name for name in inside)
    assert sorted(set(module_types(list(inside)).values())) == sorted(types)


def test_module_types_are_the_shortest_suffix_unique_in_the_block():
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
             "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj", "lm_head"]
    assert module_types(names) == {
        "transformer.h.0.attn.c_attn": "c_attn", "transformer.h.0.attn.c_proj": "attn.c_proj",
        "transformer.h.0.mlp.c_fc": "c_fc", "transformer.h.0.mlp.c_proj": "mlp.c_proj",
        "transformer.h.1.attn.c_proj": "attn.c_proj",  # the same type in a block where mlp.c_proj is left out
        "lm_head": "lm_head"}
    line = targeting_summary(names[:5], {"transformer.h.1.mlp.c_proj"})
    assert line == ("targets: 5 linear layers in 2 blocks (c_attn 1, attn.c_proj 2, c_fc 1, mlp.c_proj 1); "
                    "kept dense: transformer.h.1.mlp.c_proj")


def test_conv1d_weight_is_read_as_out_by_in():
    model = tiny_causal_lm("gpt2")
    layer = model.get_submodule("transformer.h.0.mlp.c_fc")
    assert isinstance(layer, Conv1D)
    x = torch.randn(3, 64)
    W = weight_matrix(layer)
    assert linear_shape(layer) == tuple(W.shape) == (256, 64)
    assert torch.allclose(layer(x), x @ W.T + layer.bias, atol=1e-6)


def full_rank_factors(model):
    stats = collect_statistics(model, features(), [AUTO], pad_token_id=2, progress=False)
    linears = target_linears(model, [AUTO])
    ranks = {name: min(linear_shape(linear)) for name, linear in linears.items()}
    config = EmulatorConfig(ratio=0.5, skip_last_down_proj=False)
    return build_factors(model, stats, config, progress=False, ranks=ranks), stats


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_full_rank_reproduces_the_logits(family):
    model = tiny_causal_lm(family)
    factors, _ = full_rank_factors(model)
    assert len(factors.u) == len(block_linears(model))
    ids = torch.randint(3, 1000, (2, 10))
    with torch.no_grad():
        expected, emulated = model(input_ids=ids).logits, emulate(model, factors)(input_ids=ids).logits
    assert torch.allclose(emulated, expected, atol=1e-4 * expected.abs().max())
    assert set(factors.report["type"]) == set(EXPECTED[family][0])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_corrected_adapter_reproduces_the_emulator_and_loads_with_plain_peft(family, tmp_path):
    model = tiny_causal_lm(family)
    stats = collect_statistics(model, features(), [AUTO], pad_token_id=2, progress=False)
    factors = build_factors(model, stats, EmulatorConfig(ratio=0.5), progress=False)
    emulator_lora = add_lora(emulate(model, factors), LoraConfigSpec(r=4, alpha=16), [AUTO], seed=0)
    for layer in lora_layers(emulator_lora).values():  # stand-in for training: non-zero B
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    emulator_lora.save_pretrained(tmp_path / "emulator")
    on_original = load_adapter(tiny_causal_lm(family), tmp_path / "emulator")
    report, _ = correct_adapter(on_original, factors, lam=None)
    assert set(report["type"]) == set(EXPECTED[family][0])
    compressed = report[report["module"].isin(list(factors.u))]
    assert (compressed["misalignment_after"] < 1e-5).all() and (compressed["misalignment_before"] > 1e-3).all()
    on_original.save_pretrained(tmp_path / "corrected")
    saved = json.loads((tmp_path / "corrected" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is (family == "gpt2")

    corrected = PeftModel.from_pretrained(tiny_causal_lm(family), str(tmp_path / "corrected"))  # plain peft
    assert_reproduces_inside_subspace(lora_layers(emulator_lora), lora_layers(corrected), factors.u)
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad():
        unmerged = corrected(input_ids=ids).logits
        merged = corrected.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-4)


def test_memory_budget_refuses_a_family_the_ledger_does_not_know():
    with pytest.raises(EmlocError, match=r"Llama-style models only .* gpt2 is not one"):
        plan_for_budget(tiny_causal_lm("gpt2").config, LedgerSettings(batch_size=2, seq_len=32), "inference")
    plan = plan_for_budget(tiny_causal_lm("qwen2").config, LedgerSettings(batch_size=2, seq_len=32), "1GB")
    assert set(plan.ranks) == set(EXPECTED["qwen2"][0])


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory, tokenizer):
    folders = {}
    for family in TINY_FAMILIES:
        folders[family] = tmp_path_factory.mktemp(family)
        tiny_causal_lm(family).save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
    return folders


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_quick_pipeline_runs_with_no_configuration(family, saved_families, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "quick", "--steps", "2", "--model", str(saved_families[family]),
                 "--out", str(out)]) == 0
    types, last = EXPECTED[family]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("targets:")]
    assert printed == [f"targets: {len(types) * 2} linear layers in 2 blocks "
                       f"({', '.join(f'{kind} 2' for kind in types)}); kept dense: {last}"]
    results = json.loads((out / "results.json").read_text())
    assert {"transfer_corrected", "full_lora"} <= set(results["variants"])
    corrected = PeftModel.from_pretrained(tiny_causal_lm(family), str(out / "adapters" / "corrected"))
    assert len(lora_layers(corrected)) == len(types) * 2


def test_auto_resolves_to_the_names_earlier_runs_fingerprinted(tiny_model_dir, tmp_path):
    """A run made before 'auto' (Llama's seven names, explicit) stays valid: the same fingerprints."""
    from emloc.config import LLAMA_PROJECTIONS, RunConfig
    from emloc.pipeline import Run
    from emloc.rundir import fingerprint
    from emloc.stages import STAGES

    automatic = Run(tmp_path / "auto", RunConfig.from_dict({"model": str(tiny_model_dir)})).config
    explicit = RunConfig.from_dict({"model": str(tiny_model_dir),
                                    "emulator": {"target_modules": list(LLAMA_PROJECTIONS)}})
    assert RunConfig().emulator.target_modules == [AUTO]
    assert automatic.emulator.target_modules == LLAMA_PROJECTIONS
    assert all(fingerprint(automatic, s.name) == fingerprint(explicit, s.name) for s in STAGES)


@pytest.mark.parametrize("flags,message", [
    (["--calibration", "sequential"], "GPT2LMHeadModel is not a Llama-style decoder"),
    (["--method", "prune"], "prune needs Llama-style decoder layers"),
])
def test_llama_only_builds_refuse_another_family_in_one_line(flags, message, saved_families, tmp_path, capsys):
    code = main(["run", "--preset", "quick", "--steps", "2", "--model", str(saved_families["gpt2"]),
                 "--out", str(tmp_path / "run"), *flags])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error[-1].startswith("emloc: error: ") and message in error[-1]


def test_a_model_that_cannot_be_found_is_left_to_the_stage_that_loads_it(tmp_path):
    from emloc.config import RunConfig
    from emloc.families import with_resolved_targets
    missing = RunConfig.from_dict({"model": str(tmp_path / "nowhere")})
    assert with_resolved_targets(missing).emulator.target_modules == [AUTO]


def test_peft_wraps_what_the_targets_name_when_a_regex_joins_dotted_suffixes():
    """A regex among the patterns turns peft's targets into one regex; a dotted suffix in it (attn.c_proj)
    must still match as a suffix, as it does for the emulator."""
    from emloc.correction import lora_layers
    patterns = ["c_attn", "attn.c_proj", r"transformer\.h\.0\.mlp\.c_fc"]
    model = tiny_causal_lm("gpt2")
    wanted = set(target_linears(model, patterns))
    assert len(wanted) == 5
    assert set(lora_layers(add_lora(model, LoraConfigSpec(r=2), patterns, seed=0))) == wanted
