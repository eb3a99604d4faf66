"""The base digits denoiser (a diffusers DiT) and the diffusion-transformer family, on the tiny preset."""
import json

import pytest
import torch

from emloc import denoiser
from emloc.calibration import target_linears
from conftest import assert_reproduces_inside_subspace
from emloc.cli import main
from emloc.config import EmulatorConfig
from emloc.families import (CONDITIONING, automatic_targets, block_linears, diffusion_transformer, family_of,
                            last_block_output, linear_shape)
from emloc.svd_emulator import build_factors, emulate

TINY = denoiser.DENOISER_PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_denoiser():
    return denoiser.pretrain(TINY, seed=0, progress=False)[0]


def test_pretraining_is_deterministic_for_a_seed(tiny_denoiser):
    again, summary = denoiser.pretrain(TINY, seed=0, progress=False)
    other, _ = denoiser.pretrain(TINY, seed=1, progress=False)
    state, same, different = tiny_denoiser.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    assert any(not torch.equal(state[k], different[k]) for k in state)
    assert summary["steps"] == TINY.steps and summary["final_loss"] > 0


def test_the_held_out_digit_is_never_trained_and_the_judge_reads_real_digits():
    images, labels = denoiser.pretraining_split()
    all_images, all_labels = denoiser.digit_images()
    assert denoiser.HELD_OUT_DIGIT not in set(labels.tolist()) and len(labels) == (all_labels != 7).sum()
    assert images.min() >= -1 and images.max() <= 1 and images.shape[1:] == (1, 8, 8)
    assert (denoiser.judged(all_images) == all_labels.numpy()).mean() > 0.95


def test_the_family_targets_attention_and_mlp_and_keeps_conditioning_dense(tiny_denoiser):
    assert family_of(tiny_denoiser).name == "diffusion transformer"
    # the MLP's "proj" alone would also reach the patch embedding's Conv2d (pos_embed.proj): lengthened
    assert automatic_targets(tiny_denoiser) == ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"]
    assert last_block_output(tiny_denoiser) == "transformer_blocks.1.ff.net.2"
    inside = block_linears(tiny_denoiser)
    assert len(inside) == 6 * TINY.num_layers and not any(CONDITIONING.search(name) for name in inside)
    with_conditioning = automatic_targets(tiny_denoiser, diffusion_transformer(keep_conditioning_dense=False))
    assert {"linear", "linear_1", "linear_2"} <= set(with_conditioning)
    linears = sum(m.weight.numel() for m in tiny_denoiser.modules() if isinstance(m, torch.nn.Linear))
    assert linears / sum(p.numel() for p in tiny_denoiser.parameters()) > 0.9  # like FLUX: nearly all linear


def denoiser_statistics(model, seed=0, n=16):
    """C from 16 training digits noised at training-distributed timesteps."""
    images, labels = denoiser.pretraining_split()
    pick = torch.randint(0, len(images), (n,), generator=torch.Generator().manual_seed(seed))
    return denoiser.calibration_statistics(model, images[pick], labels[pick], TINY, seed)


def test_calibration_sees_every_target_and_full_rank_reproduces_the_denoiser(tiny_denoiser):
    stats = denoiser_statistics(tiny_denoiser)
    targets = target_linears(tiny_denoiser, ["auto"])
    assert set(stats.input_of) == set(targets)
    assert all(stats.token_counts[leader] == 16 * 16 for leader in stats.covariances)  # 16 images x 16 patches
    ranks = {name: min(linear_shape(linear)) for name, linear in targets.items()}
    factors = build_factors(tiny_denoiser, stats, EmulatorConfig(skip_last_down_proj=False), progress=False,
                            ranks=ranks)
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([10, 500, 900]), torch.tensor([0, 3, 7])
    with torch.no_grad():
        expected = tiny_denoiser(x, timestep=t, class_labels=y).sample
        emulated = emulate(tiny_denoiser, factors)(x, timestep=t, class_labels=y).sample
    assert torch.allclose(emulated, expected, atol=1e-4)
    assert list(dict.fromkeys(factors.report["type"])) == ["to_q", "to_k", "to_v", "to_out.0", "proj", "net.2"]


def test_samples_and_judged_accuracy_have_the_asked_shape(tiny_denoiser):
    images = denoiser.sample(tiny_denoiser, torch.tensor([0, 1, 2]), TINY, seed=0)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1
    assert torch.equal(images, denoiser.sample(tiny_denoiser, torch.tensor([0, 1, 2]), TINY, seed=0))
    table = denoiser.judged_accuracy(tiny_denoiser, TINY, per_class=2)
    assert list(table.index) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert table["share_judged_as_asked"].between(0, 1).all()


def test_one_command_pretrains_saves_and_then_reuses(tmp_path, capsys):
    out = tmp_path / "denoiser"
    assert main(["denoiser", "--preset", "tiny", "--seed", "0", "--out", str(out)]) == 0
    assert "judged the digit asked for" in capsys.readouterr().out
    record = json.loads((out / "pretraining.json").read_text())
    assert record["preset"] == "tiny" and record["held_out"] == 7 and 0 <= record["judged_as_asked"] <= 1
    reloaded = denoiser.load_denoiser(out)
    fresh, _ = denoiser.pretrain(TINY, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), fresh.state_dict().values()))
    stamp = (out / "pretraining.json").stat().st_mtime_ns
    assert main(["denoiser", "--preset", "tiny", "--out", str(out)]) == 0  # cached: not pretrained again
    assert (out / "pretraining.json").stat().st_mtime_ns == stamp


def test_a_bad_preset_is_a_one_line_error(capsys):
    assert main(["denoiser", "--preset", "huge"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_dreambooth_data_and_batches_mix_subject_and_prior_as_configured():
    data = denoiser.dreambooth_data(n_subject=10, n_prior=50, seed=0)
    assert data.subject.shape == (10, 1, 8, 8) and data.prior.shape == (50, 1, 8, 8)
    assert denoiser.HELD_OUT_DIGIT not in set(data.prior_labels.tolist())
    assert (denoiser.judged(data.subject) == denoiser.HELD_OUT_DIGIT).mean() >= 0.8  # real 7s
    generator = torch.Generator().manual_seed(0)
    images, labels, is_prior = denoiser.dreambooth_batch(data, 8, prior_share=0.25, generator=generator)
    assert images.shape == (8, 1, 8, 8) and int(is_prior.sum()) == 2
    assert (labels[~is_prior] == denoiser.HELD_OUT_DIGIT).all() and (labels[is_prior] != 7).all()
    no_prior = denoiser.DreamBoothData(data.subject, data.prior[:0], data.prior_labels[:0])
    assert not denoiser.dreambooth_batch(no_prior, 8, 0.5, generator)[2].any()
    with pytest.raises(denoiser.EmlocError, match="subject"):
        denoiser.dreambooth_data(n_subject=0)


def test_dreambooth_loss_adds_the_weighted_prior_term(tiny_denoiser):
    data = denoiser.dreambooth_data(n_subject=4, n_prior=8, seed=1)
    scheduler = denoiser.noise_scheduler(TINY)
    batch = denoiser.dreambooth_batch(data, 6, 0.5, torch.Generator().manual_seed(0))
    losses = {w: denoiser.dreambooth_loss(tiny_denoiser, *batch, scheduler, torch.Generator().manual_seed(1),
                                          prior_weight=w) for w in (0.0, 1.0, 2.0)}
    prior_term = losses[1.0] - losses[0.0]
    assert prior_term > 0 and torch.allclose(losses[2.0] - losses[0.0], 2 * prior_term, rtol=1e-5)


def test_nearest_distance_is_zero_for_a_copy_and_metrics_are_shares(tiny_denoiser):
    data = denoiser.dreambooth_data(n_subject=5, n_prior=5, seed=0)
    assert torch.allclose(denoiser.nearest_distance(data.subject, data.subject), torch.zeros(5), atol=1e-6)
    assert (denoiser.nearest_distance(data.prior, data.subject) > 0.05).all()
    metrics = denoiser.dreambooth_metrics(tiny_denoiser, TINY, data, per_class=2)
    assert metrics["samples"] == 20 and metrics["memorisation"] > 0
    assert all(0 <= metrics[key] <= 1 for key in ("subject_fidelity", "prior_preservation", "quality"))


def test_dreambooth_lora_on_the_emulator_is_corrected_for_the_original(tiny_denoiser, tmp_path):
    """The EMLoC stages on a denoiser: calibrate on noised DreamBooth images, build the emulator, train LoRA on
    it with the DreamBooth objective, correct the adapter for the original (peft, no task type)."""
    import copy

    from emloc.config import LoraConfigSpec
    from emloc.correction import correct_adapter, lora_layers
    from emloc.lora import add_lora, load_adapter
    data = denoiser.dreambooth_data(n_subject=6, n_prior=12, seed=0)
    images = torch.cat([data.subject, data.prior])
    labels = torch.cat([torch.full((6,), 7), data.prior_labels])
    stats = denoiser.calibration_statistics(tiny_denoiser, images, labels, TINY, seed=0)
    factors = build_factors(tiny_denoiser, stats, EmulatorConfig(ratio=0.5), progress=False)
    emulator_lora = add_lora(emulate(tiny_denoiser, factors), LoraConfigSpec(r=2, alpha=4), ["auto"], seed=0)
    losses = denoiser.train_dreambooth(emulator_lora, data, TINY, steps=3, learning_rate=1e-2, batch_size=6,
                                       progress=False)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    emulator_lora.save_pretrained(tmp_path / "emulator")
    config = json.loads((tmp_path / "emulator" / "adapter_config.json").read_text())
    assert config["task_type"] is None and sorted(config["target_modules"]) == sorted(
        ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"])
    on_original = load_adapter(copy.deepcopy(tiny_denoiser), tmp_path / "emulator")
    report, _ = correct_adapter(on_original, factors, lam=None)
    compressed = report[report["module"].isin(list(factors.u))]
    assert len(compressed) == len(factors.u) and (compressed["misalignment_after"] < 1e-5).all()
    assert_reproduces_inside_subspace(lora_layers(emulator_lora), lora_layers(on_original), factors.u)
