"""Training that spends less memory gives the same training: checkpointing, accumulation; the budget planner."""
import pytest
import torch
from transformers import TrainerCallback

from emloc.config import LLAMA_PROJECTIONS, LoraConfigSpec, RunConfig
from emloc.data import IGNORE_INDEX, PaddingCollator, longest_lengths
from emloc.errors import EmlocError
from emloc.lora import add_lora, checkpointing_arguments, train_lora
import emloc.memory as memory_module  # noqa: E402
from emloc.memory import LedgerSettings, ledger  # noqa: E402
from emloc.models import tiny_llama

PAD = 2


def features(n: int = 8, seed: int = 0) -> list[dict]:
    """Examples of different lengths, the last 2-4 tokens labelled (so padding and windows differ per batch)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (i * 3) % 7
        ids = torch.randint(3, 200, (length,), generator=g).tolist()
        answer = 2 + i % 3
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length - answer) + ids[-answer:]})
    return rows


def lora_state(trained) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trained.model.named_parameters() if "lora_" in n}


def train(spec: LoraConfigSpec, data: list[dict]):
    return train_lora(tiny_llama(seed=0), data, spec, LLAMA_PROJECTIONS, PAD, seed=0, progress=False)


def test_checkpointed_loss_and_lora_gradients_equal_plain():
    batch = PaddingCollator(PAD)(features())
    grads, losses = [], []
    for checkpointing in (False, True):
        model = add_lora(tiny_llama(seed=0), LoraConfigSpec(), LLAMA_PROJECTIONS, seed=0)
        with torch.no_grad():  # B != 0, so every LoRA weight gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        kwargs = checkpointing_arguments(model, checkpointing)
        assert bool(kwargs) == checkpointing
        if kwargs:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs["activation_checkpointing_kwargs"])
        model.train()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_checkpointed_training_follows_the_plain_run():
    data = features(16)
    spec = LoraConfigSpec(steps=3, batch_size=4, warmup_steps=0, learning_rate=5e-3)
    plain = train(LoraConfigSpec(**{**spec.__dict__, "gradient_checkpointing": False}), data)
    checkpointed = train(spec, data)
    assert [s for s, _ in plain.history] == [1, 2, 3]
    # the recomputed forward is the same sequence of CPU kernels: bitwise the same run
    assert checkpointed.history == plain.history
    for name, weight in lora_state(plain).items():
        assert torch.equal(lora_state(checkpointed)[name], weight), name
    assert not checkpointed.model.get_base_model().is_activation_checkpointing  # switched off after training


class GradientCapture(TrainerCallback):
    """The LoRA gradients the optimizer is about to apply, per optimizer step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("micro", [1, 4])
def test_accumulated_micro_batches_equal_the_full_batch(micro):
    data = features(16)
    spec = LoraConfigSpec(steps=2, batch_size=8, warmup_steps=0, learning_rate=5e-3, gradient_checkpointing=False)
    runs = []
    for micro_batch in (None, micro):
        capture = GradientCapture()
        trained = train_lora(tiny_llama(seed=0, dtype=torch.float64), data, LoraConfigSpec(**{**spec.__dict__, "micro_batch_size": micro_batch}),
                             LLAMA_PROJECTIONS, PAD, seed=0, progress=False, callbacks=[capture])
        runs.append((trained, capture.steps))
    (full, full_grads), (accumulated, accumulated_grads) = runs
    # the loss is normalised by the whole batch's labelled tokens, not averaged per micro batch
    assert [l for _, l in accumulated.history] == pytest.approx([l for _, l in full.history], rel=1e-6)  # logged in float32
    assert len(full_grads) == len(accumulated_grads) == 2
    for full_step, accumulated_step in zip(full_grads, accumulated_grads):
        for name, grad in full_step.items():
            assert grad.abs().sum() > 0 or "lora_A" in name  # B = 0 at the start: A gets no gradient in step 1
            # float64: rounding only; a wrong normalisation (mean of micro-batch means) would be off by O(1)
            assert float((accumulated_step[name] - grad).norm()) <= 1e-9 * float(grad.norm()) + 1e-15, name
    for name, weight in lora_state(full).items():
        torch.testing.assert_close(lora_state(accumulated)[name], weight, rtol=1e-9, atol=1e-12)


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(EmlocError, match="micro_batch_size = 3 does not divide lora.batch_size = 8"):
        RunConfig.from_dict({"lora": {"batch_size": 8, "micro_batch_size": 3}})
    assert RunConfig.from_dict({"lora": {"batch_size": 8, "micro_batch_size": 2}}).lora.micro_batch_size == 2


@pytest.mark.parametrize("budget", ["inference", "1500MB", "2gb", "0.5 GiB"])
def test_memory_budget_accepts_inference_or_an_amount(budget):
    assert RunConfig.from_dict({"memory_budget": budget}).memory_budget == budget


@pytest.mark.parametrize("budget", ["lots", "-1GB", "12", "0MB"])
def test_memory_budget_rejects_other_text_in_one_line(budget):
    with pytest.raises(EmlocError) as error:
        RunConfig.from_dict({"memory_budget": budget})
    assert "\n" not in str(error.value) and "'inference'" in str(error.value)


def tiny_config():
    return tiny_llama(seed=0, hidden_size=256, intermediate_size=512, num_layers=4, vocab_size=4096).config


def test_planner_refuses_an_impossible_budget_in_one_line():
    with pytest.raises(EmlocError) as error:
        memory_module.plan_for_budget(tiny_config(), LedgerSettings(batch_size=8, seq_len=64, dtype="float32"), "1MB")
    message = str(error.value)
    assert "\n" not in message and "1MB" in message and "memory" in message


@pytest.mark.parametrize("budget", ["inference", "60MB", "30MB"])
def test_planner_plan_fits_its_budget_by_the_ledger(budget):
    config = tiny_config()
    settings = LedgerSettings(batch_size=8, seq_len=256, dtype="float32", ratio=0.5)
    plan = memory_module.plan_for_budget(config, settings, budget)
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    chosen = LedgerSettings(**{**settings.__dict__, "ratio": plan.ratio, "micro_batch_size": plan.micro_batch_size,
                               "gradient_checkpointing": plan.gradient_checkpointing})
    # the plan's prediction is the ledger's total for the chosen settings (plus the runtime share, 0 here)
    assert plan.predicted_peak_bytes == pytest.approx(ledger(config, chosen).loc["LoRA (emulator)", "total"] * 2**30)
    assert 0 < plan.ratio <= settings.ratio and settings.batch_size % plan.micro_batch_size == 0
    assert set(plan.ranks) == set(LLAMA_PROJECTIONS) and all(r >= 1 for r in plan.ranks.values())
    text = str(plan)
    assert "ratio" in text and "budget" in text and "q_proj" in text


def test_planner_keeps_the_given_ratio_when_it_fits_and_lowers_it_when_not():
    config = tiny_config()
    settings = LedgerSettings(batch_size=8, seq_len=256, dtype="float32", ratio=0.5)
    roomy = memory_module.plan_for_budget(config, settings, "1GB")
    assert roomy.ratio == 0.5 and roomy.micro_batch_size == 8 and not roomy.gradient_checkpointing
    tight = memory_module.plan_for_budget(config, settings, "inference")
    assert tight.gradient_checkpointing or tight.micro_batch_size < 8 or tight.ratio < 0.5


def test_ledger_checkpointing_and_micro_batches_lower_only_the_activations():
    config = tiny_config()
    base = LedgerSettings(batch_size=8, seq_len=128, dtype="float32")
    plain = ledger(config, base)
    lean = ledger(config, LedgerSettings(**{**base.__dict__, "gradient_checkpointing": True, "micro_batch_size": 2}))
    for stage in ("LoRA (original)", "LoRA (emulator)"):
        assert lean.loc[stage, "activations"] < plain.loc[stage, "activations"]
        assert lean.loc[stage, "weights"] == plain.loc[stage, "weights"]
    assert lean.loc["inference (original)", "total"] == plain.loc["inference (original)", "total"]


def test_longest_lengths_are_the_largest_batch_and_window_training_makes():
    rows = features(8)
    seq_len, window = longest_lengths(rows)
    batch = PaddingCollator(PAD)(rows)
    assert batch["input_ids"].shape[1] == seq_len and batch["logits_to_keep"] == window


def test_the_planner_sizes_training_by_the_runs_data_and_the_budget_by_its_worst_case():
    config = RunConfig.from_dict({"dtype": "float32", "data": {"max_length": 128}})
    rows = features(8)
    sized = memory_module.run_ledger_settings(config, rows)
    assert (sized.seq_len, sized.loss_tokens) == longest_lengths(rows)
    worst = memory_module.run_ledger_settings(config)
    assert (worst.seq_len, worst.loss_tokens) == (128, None)


def test_allocator_slack_grows_with_the_micro_batch_and_touches_training_rows_only():
    config = tiny_config()
    base = LedgerSettings(batch_size=8, seq_len=64, dtype="float32", gradient_checkpointing=True,
                          micro_batch_size=2)
    slack = LedgerSettings(**{**base.__dict__, "allocator_slack": 0.3})
    plain, padded = ledger(config, base), ledger(config, slack)
    added = (padded - plain)["total"]
    assert added["inference (original)"] == 0
    assert added["LoRA (emulator)"] == pytest.approx(added["LoRA (original)"]) and added["LoRA (emulator)"] > 0
    doubled = ledger(config, LedgerSettings(**{**slack.__dict__, "micro_batch_size": 4}))
    plain4 = ledger(config, LedgerSettings(**{**base.__dict__, "micro_batch_size": 4}))
    assert (doubled - plain4)["total"]["LoRA (emulator)"] == pytest.approx(2 * added["LoRA (emulator)"])


@pytest.mark.parametrize("tunables, slack", [("glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0", memory_module.COMPACT_HEAP_SLACK), ("", 0.0)])
def test_planning_counts_the_compact_heaps_slack_only_when_it_is_active(monkeypatch, tunables, slack):
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    settings = memory_module.planning_settings(RunConfig.from_dict({"dtype": "float32"}), features(4))
    assert settings.allocator_slack == slack and settings.runtime_bytes > 0


def test_the_cli_plans_from_the_runs_training_data(tiny_model_dir, tmp_path, capsys):
    from emloc import cli, pipeline
    from conftest import tiny_run_config
    config = tiny_run_config(tiny_model_dir, memory_budget="2GB", dtype="float32")
    run = cli.planned(pipeline.Run(tmp_path / "run", config, progress=False), "train")
    printed = capsys.readouterr().out
    assert "memory plan for budget '2GB'" in printed and "predicted peak" in printed
    seq_len, window = longest_lengths(run.features("train"))
    assert run.features("train") is run.features("train")  # encoded once, read by the plan and by training
    assert seq_len < config.data.max_length and window < seq_len  # sized by the data, not the worst case
    assert config.lora.batch_size % run.config.lora.micro_batch_size == 0
    untouched = cli.planned(pipeline.Run(tmp_path / "other", config, progress=False), "calibrate")
    assert untouched.config.lora == config.lora and not capsys.readouterr().out
