"""Baseline emulators (layer drop, structured pruning): budget, shapes, recovery to the original model."""
import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from conftest import tiny_run_config
from emloc import baselines, pipeline
from emloc.config import LLAMA_PROJECTIONS, LoraConfigSpec, RunConfig
from emloc.lora import add_lora
from emloc.errors import EmlocError
from emloc.models import tiny_llama


def test_uniform_layer_subset_keeps_first_last_and_spreads():
    assert baselines.uniform_layer_subset(30, 15)[:1] == [0] and baselines.uniform_layer_subset(30, 15)[-1] == 29
    for n, k in [(30, 15), (30, 8), (6, 3), (4, 2), (5, 5), (10, 9)]:
        kept = baselines.uniform_layer_subset(n, k)
        assert len(kept) == k and len(set(kept)) == k and kept == sorted(kept)
    gaps = torch.diff(torch.tensor(baselines.uniform_layer_subset(30, 8)))
    assert gaps.max() - gaps.min() <= 1


def test_prune_sizes_track_the_ratio_on_smollm_shapes():
    hidden, inter, head_dim, heads, kv = 576, 1536, 64, 9, 3
    total = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter
    for ratio in (0.25, 0.4, 0.5, 0.75):
        per_group, channels = baselines.prune_sizes(ratio, hidden, inter, head_dim, heads, kv)
        kept = 2 * hidden * kv * per_group * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * channels
        assert abs(kept / total - ratio) < 0.01, ratio


def test_zero_fill_places_the_update_inside_the_original_weight():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 4, generator=g), torch.randn(5, 3, generator=g)
    rows, cols = torch.tensor([0, 2, 3, 6, 7]), torch.tensor([1, 2, 5, 8])
    A_full, B_full = baselines.zero_fill(A, B, 9, 10, rows, cols)
    assert A_full.shape == (3, 10) and B_full.shape == (9, 3)
    delta = B_full @ A_full
    assert torch.allclose(delta[rows][:, cols], B @ A)
    mask = torch.ones(9, 10, dtype=torch.bool)
    mask[rows[:, None], cols] = False
    assert delta[mask].abs().max() == 0


def test_importance_prefers_channels_with_large_inputs_and_weights():
    W = torch.ones(4, 3)
    C = torch.diag(torch.tensor([1.0, 9.0, 4.0]))
    assert torch.equal(baselines.top_k_sorted(baselines.channel_importance(W, C), 2), torch.tensor([1, 2]))
    heads = baselines.heads_to_keep(torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0, 0.0]), n_kv_heads=2, per_group=2)
    assert heads.tolist() == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tokenizer):
    """A 4-layer tiny Llama (layer drop keeps the first and last layers, so 2 layers would keep all)."""
    folder = tmp_path_factory.mktemp("tiny-llama-4")
    tiny_llama(seed=0, num_layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def baseline_runs(deep_model_dir, tmp_path_factory):
    """An SVD emulator (built only) and the layer-drop and prune baselines through train/correct/evaluate."""
    root = tmp_path_factory.mktemp("baselines")
    runs = {}
    for method in ("activation_aware", "layer_drop", "prune"):
        run = pipeline.Run(root / method, tiny_run_config(deep_model_dir, emulator={"method": method}), progress=False)
        pipeline.calibrate(run)
        pipeline.build(run)
        if method != "activation_aware":
            pipeline.train(run, "emulator")
            pipeline.correct(run)
            pipeline.evaluate(run)
        runs[method] = run
    return runs


def _params(run) -> tuple[int, int]:
    manifest = json.loads(run.manifest_path("build").read_text())
    return manifest["params_original"], manifest["params_emulator"]


def test_baselines_match_the_svd_parameter_budget(baseline_runs):
    original, svd = _params(baseline_runs["activation_aware"])
    for method in ("layer_drop", "prune"):
        report = baseline_runs[method].factors().report
        kept_share = report["params_after"].sum() / report["params_before"].sum()
        assert abs(kept_share - 0.5) < 0.05, (method, kept_share)
        # the whole model (embeddings included) is within a few % of the SVD emulator
        assert abs(_params(baseline_runs[method])[1] / svd - 1) < 0.05, method
    assert svd < original


def test_structured_emulators_have_the_expected_shapes(baseline_runs):
    drop = baseline_runs["layer_drop"]
    assert drop.factors().kept_layers == [0, 3]
    emulator = drop.emulator()
    assert isinstance(emulator.model.layers[1], baselines.SkippedLayer)
    model = baseline_runs["prune"].emulator()
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.q_proj.out_features == attention.o_proj.in_features == 2 * attention.head_dim
    # budget 0.5 * 36864 weights per layer: attention keeps 8192 (1 query head per group), the MLP 53 of 128 channels
    assert attention.num_key_value_groups == 1 and mlp.gate_proj.out_features == mlp.down_proj.in_features == 53
    tokens = torch.tensor([[1, 5, 7, 9]])
    for m in (emulator, model):
        assert m(input_ids=tokens).logits.shape == (1, 4, m.config.vocab_size)


def test_recovered_adapters_load_with_plain_peft_and_reproduce_the_pruned_update(baseline_runs):
    reference = add_lora(tiny_llama(seed=0, num_layers=4), LoraConfigSpec(), list(LLAMA_PROJECTIONS), seed=0)
    expected_keys = set(get_peft_model_state_dict(reference))
    for method in ("layer_drop", "prune"):
        run = baseline_runs[method]
        results = run.results()
        assert set(results["variants"]) == {"zero_shot", "emulator", "emulator_lora", "transfer_uncorrected"}
        assert results["notes"] == [pipeline.CORRECTION_SKIPPED]
        loaded = PeftModel.from_pretrained(tiny_llama(seed=0, num_layers=4), str(run.adapter_dir("recovered")))
        assert set(get_peft_model_state_dict(loaded)) == expected_keys
    # layer drop: dropped layers' adapters are zero (B = 0), kept layers' are trained
    drop = PeftModel.from_pretrained(tiny_llama(seed=0, num_layers=4), str(baseline_runs["layer_drop"].adapter_dir("recovered")))
    state = get_peft_model_state_dict(drop)
    assert all(t.abs().max() == 0 for k, t in state.items() if "lora_B" in k and (".1." in k or ".2." in k))
    assert all(t.abs().max() > 0 for k, t in state.items() if "lora_B" in k and (".0." in k or ".3." in k))
    # pruning: the recovered update equals the pruned update on the kept channels, zero elsewhere
    prune = baseline_runs["prune"]
    structure = prune.factors()
    trained = PeftModel.from_pretrained(prune.emulator(), str(prune.adapter_dir("emulator")))
    recovered = PeftModel.from_pretrained(tiny_llama(seed=0, num_layers=4), str(prune.adapter_dir("recovered")))
    name = "model.layers.1.mlp.down_proj"

    def delta(model):
        layer = model.get_base_model().get_submodule(name)
        return layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    cols = structure.cols[name]
    assert torch.allclose(delta(recovered)[:, cols], delta(trained), atol=1e-6)
    assert delta(recovered).abs().sum() > 0
    others = torch.ones(delta(recovered).shape[1], dtype=torch.bool)
    others[cols] = False
    assert delta(recovered)[:, others].abs().max() == 0


def test_unknown_method_and_unsupported_options_are_one_line_errors(tiny_model_dir):
    with pytest.raises(EmlocError, match="emulator.method"):
        RunConfig.from_dict({"emulator": {"method": "distill"}})
    config = tiny_run_config(tiny_model_dir, emulator={"method": "prune", "ratio_patterns": {".*mlp.*": 0.3}})
    with pytest.raises(EmlocError, match="ratio_patterns"):
        baselines.build_structured(tiny_llama(), None, config.emulator)


def test_every_emulator_kind_round_trips_through_its_folder_and_applies_alike(baseline_runs, tmp_path):
    """One interface: load -> save -> load gives the same emulator, and applying it gives the manifest's size."""
    from emloc.svd_emulator import count_parameters
    from emloc.emulator_kinds import SvdEmulator, emulator_kind

    for method, run in baseline_runs.items():
        kind = emulator_kind(method)
        emulator = run.factors()
        assert isinstance(emulator, kind) and kind.corrects == (method == "activation_aware")
        assert kind.transfer_adapter == ("emulator" if kind is SvdEmulator else "recovered")
        emulator.save(tmp_path / method)
        again = kind.load(tmp_path / method, emulator.method)
        assert again.method == emulator.method and again.report.equals(emulator.report)
        params_original, params_emulator = _params(run)
        assert emulator.parameters(params_original, run.fresh_model) == params_emulator
        assert count_parameters(again.apply(run.fresh_model())) == params_emulator
