"""The EMLoC stages on a tiny Llava (CLIP vision tower + projector + Llama) with synthetic image + text data."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import PeftModel

from emloc import vlm
from emloc.calibration import collect_statistics
from emloc.config import EmulatorConfig, LoraConfigSpec
from emloc.errors import EmlocError
from emloc.lowrank import rank_from_ratio
from emloc.models import load_tokenizer, tiny_llama, torch_threads

RATIOS = {"vision": 0.7, "projector": 0.8, "language": 0.4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny decompositions: one thread avoids oversubscribing a busy 2-core machine."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def vlm_tokenizer():
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def stages(vlm_tokenizer):
    model = vlm.tiny_llava(len(vlm_tokenizer), seed=0)
    config = EmulatorConfig(ratio=0.5, ratio_patterns=vlm.part_ratio_patterns(**RATIOS), target_modules=vlm.VLM_TARGETS)
    spec = LoraConfigSpec(r=4, alpha=8.0, steps=3, batch_size=4, warmup_steps=0, learning_rate=1e-2)
    result = vlm.run_vlm_stages(model, vlm_tokenizer, vlm.make_shape_data(16, seed=1), vlm.make_shape_data(6, seed=2),
                                config, spec, clamp=None)
    return model, result


def test_images_are_seeded_and_varied():
    first, again = vlm.make_shape_data(8, seed=0), vlm.make_shape_data(8, seed=0)
    assert all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(first, again))
    assert first[0].pixel_values.shape == (3, 32, 32) and first[0].pixel_values.abs().max() <= 1
    assert len({e.response for e in vlm.make_shape_data(40, seed=0)}) == len(vlm.COLOURS)
    with pytest.raises(EmlocError, match="question"):
        vlm.make_shape_data(2, question="size")


def test_calibration_covers_all_parts_and_keeps_every_patch(stages, vlm_tokenizer):
    model, result = stages
    stats = result.stats
    parts = {vlm.part_of(name) for name in stats.input_of}
    assert parts == {"vision", "projector", "language"}
    # q/k/v share one C in both the CLIP tower and the Llama; fc1/out_proj/linear_1 read their own inputs
    for prefix in ("model.vision_tower.encoder.layers.1.self_attn", "model.language_model.layers.1.self_attn"):
        assert stats.input_of[f"{prefix}.k_proj"] == stats.input_of[f"{prefix}.v_proj"] == f"{prefix}.q_proj"
    assert len(stats.covariances) == 2 * 4 + 2 + 2 * 4
    # the text mask drops padding in the language model only; all 17 vision positions (16 patches + CLS) count
    features = vlm.encode_image_examples(vlm_tokenizer, vlm.make_shape_data(6, seed=2), model.config.image_token_id,
                                         vlm.image_token_count(model))
    assert stats.token_counts["model.vision_tower.encoder.layers.0.self_attn.q_proj"] == 6 * 17
    assert stats.token_counts["model.language_model.layers.0.self_attn.q_proj"] == sum(len(f["input_ids"]) for f in features)
    assert stats.token_counts["model.multi_modal_projector.linear_1"] == 6 * 16


def test_each_part_gets_its_own_ratio(stages):
    report = stages[1].factors.report
    assert len(report) == 2 * 6 + 2 + 2 * 7 - 1  # the language model's last down_proj stays dense
    assert "model.language_model.layers.1.mlp.down_proj" not in set(report["module"])
    for row in report.itertuples():
        rho = RATIOS[vlm.part_of(row.module)]
        assert row.ratio == rho and row.rank == rank_from_ratio(rho, row.out_features, row.in_features)
    assert (report["calibration_error"] > 0).all() and (report["calibration_error"] < 1).all()


def test_corrected_adapter_reproduces_the_finetuned_emulator_in_its_subspace(stages):
    model, result = stages
    trained = result.emulator_lora.get_base_model()
    corrected = result.corrected.get_base_model()
    checked = set()
    for name in ["model.vision_tower.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_2",
                 "model.language_model.layers.1.self_attn.o_proj"]:
        emulator_layer, original_layer = trained.get_submodule(name), corrected.get_submodule(name)
        A, B = emulator_layer.lora_A["default"].weight.double(), emulator_layer.lora_B["default"].weight.double()
        A2, B2 = original_layer.lora_A["default"].weight.double(), original_layer.lora_B["default"].weight.double()
        s = original_layer.scaling["default"]
        assert B.abs().sum() > 0, "the adapter was trained"
        W, W_emulated = model.get_submodule(name).weight.double(), result.factors.W_emulated(name).double()
        x = A.T @ torch.randn(A.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close((W + s * B2 @ A2) @ x, (W_emulated + s * B @ A) @ x, rtol=1e-4, atol=1e-5)
        assert not torch.allclose((W + s * B @ A) @ x, (W_emulated + s * B @ A) @ x, atol=1e-4)
        checked.add(vlm.part_of(name))
    assert checked == {"vision", "projector", "language"}
    assert set(result.correction_report["part"]) == checked
    assert (result.correction_report["misalignment_after"] < 1e-6).all()


def test_adapter_loads_with_plain_peft_and_runs_on_images(stages, vlm_tokenizer, tmp_path):
    model, result = stages
    result.corrected.save_pretrained(tmp_path / "corrected")
    fresh = vlm.tiny_llava(len(vlm_tokenizer), seed=0)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "corrected"))
    examples = vlm.make_shape_data(4, seed=3)
    loss = vlm.response_loss(peft_model, vlm_tokenizer, examples)
    assert loss == pytest.approx(vlm.response_loss(result.corrected, vlm_tokenizer, examples), rel=1e-5)
    assert loss != pytest.approx(vlm.response_loss(model, vlm_tokenizer, examples), rel=1e-6)


def test_a_text_only_model_is_refused(vlm_tokenizer):
    with pytest.raises(EmlocError, match="Llava-style"):
        vlm.run_vlm_stages(tiny_llama(), vlm_tokenizer, [], [], EmulatorConfig(), LoraConfigSpec())
