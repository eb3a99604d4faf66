"""Mixed precision training (``lora.precision``): the choice, what stays float32, today's training unchanged,
the config and command-line checks, and fingerprints."""
import json

import pytest
import torch
from transformers import TrainerCallback

from conftest import tiny_run_config
from emloc import cli, pipeline, precision
from emloc.config import LLAMA_PROJECTIONS, PRECISIONS, LoraConfigSpec, RunConfig
from emloc.data import IGNORE_INDEX
from emloc.errors import EmlocError
from emloc.lora import train_lora
from emloc.models import tiny_llama
from emloc.rundir import fingerprint
from emloc.stages import STAGES

PAD = 2
SPEC = {"steps": 4, "batch_size": 4, "warmup_steps": 0, "learning_rate": 5e-3}
WITHOUT_BF16 = {"avx2": True, "avx512_f": True, "amx_bf16": False, "avx512_bf16": False}
"""``torch.cpu.get_capabilities()`` of an AVX512 CPU without native bfloat16."""


def features(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 200, (8 + i % 4,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - 3) + ids[-3:]})
    return rows


def train(callbacks=(), **spec):
    return train_lora(tiny_llama(seed=0), features(), LoraConfigSpec(**(SPEC | spec)), LLAMA_PROJECTIONS, PAD,
                      seed=0, progress=False, callbacks=list(callbacks))


def lora_state(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without AMX-BF16 or AVX512-BF16, as torch would report it."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: WITHOUT_BF16)


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AMX-BF16"])


class Observe(TrainerCallback):
    """During training: the dtype a frozen projection computes in, and the optimizer state's dtypes."""

    def __init__(self, model_layer):
        self.compute, self.state = set(), set()
        self.hook = model_layer.register_forward_hook(lambda module, args, out: self.compute.add(out.dtype))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.state |= {v.dtype for s in optimizer.state.values() for v in s.values()
                       if torch.is_tensor(v) and v.is_floating_point()}

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()


def test_auto_never_picks_bf16_mixed_without_native_bfloat16(no_native_bf16, capsys):
    assert precision.cpu_bf16_features() == []
    choice = precision.choose_precision("auto", "cpu")
    assert (choice.precision, choice.native) == ("32-true", False)
    precision.announce(choice)
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and out.startswith("lora.precision auto -> 32-true: ")
    assert "no native bfloat16" in out
    assert precision.trainer_arguments(choice, torch.device("cpu")) == {}


def test_auto_picks_bf16_mixed_with_native_bfloat16(native_bf16, capsys):
    choice = precision.choose_precision("auto", "cpu")
    assert (choice.precision, choice.native) == ("bf16-mixed", True)
    precision.announce(choice)
    out = capsys.readouterr().out
    assert out == "lora.precision auto -> bf16-mixed: the CPU has AMX-BF16\n"
    assert precision.trainer_arguments(choice, torch.device("cpu")) == {"bf16": True}
    # an explicit choice is kept and, on native hardware, says nothing
    assert precision.choose_precision("bf16-mixed", "cpu").line() is None


def test_the_probe_reads_torchs_cpu_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: WITHOUT_BF16 | {"amx_bf16": True, "avx512_bf16": True})
    assert precision.cpu_bf16_features() == ["AMX-BF16", "AVX512-BF16"]
    assert precision.native_bf16("cpu") == (True, "the CPU has AMX-BF16, AVX512-BF16")
    monkeypatch.undo()
    assert isinstance(precision.cpu_bf16_features(), list)  # this machine: whatever it has


def test_explicit_bf16_mixed_without_native_bfloat16_warns_in_one_line_and_trains(no_native_bf16, capsys):
    result = train(steps=2, precision="bf16-mixed")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("emloc: warning: lora.precision bf16-mixed"), err
    assert "very slow" in err and "32-true or auto" in err
    assert result.precision == "bf16-mixed" and len(result.history) == 2


def test_bf16_mixed_keeps_lora_weights_and_optimizer_state_float32_and_the_loss_close():
    runs = {}
    for name in ("32-true", "bf16-mixed"):
        model = tiny_llama(seed=0)
        observe = Observe(model.model.layers[0].self_attn.q_proj)
        spec = LoraConfigSpec(**(SPEC | {"precision": name}))
        runs[name] = (train_lora(model, features(), spec, LLAMA_PROJECTIONS, PAD, seed=0, progress=False,
                                 callbacks=[observe]), observe)
    (full, full_seen), (mixed, mixed_seen) = runs["32-true"], runs["bf16-mixed"]
    assert full_seen.compute == {torch.float32} and mixed_seen.compute == {torch.bfloat16}  # autocast was on
    assert full_seen.state == mixed_seen.state == {torch.float32}  # AdamW's moments (and step) stay float32
    assert mixed.precision == "bf16-mixed" and full.precision == "32-true"
    assert {p.dtype for p in lora_state(mixed).values()} == {torch.float32}
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}  # frozen weights stay in dtype too
    mixed_losses, full_losses = [loss for _, loss in mixed.history], [loss for _, loss in full.history]
    assert all(torch.isfinite(torch.tensor(mixed_losses)))
    assert mixed_losses == pytest.approx(full_losses, rel=5e-3)
    assert mixed_losses != full_losses  # it really computed in bfloat16
    # afterwards the model computes plainly again (evaluation is float32, as before)
    assert mixed.model.forward.__func__ is type(mixed.model).forward  # accelerate's autocast wrapper is gone
    batch = {"input_ids": torch.tensor([features()[0]["input_ids"]])}
    with torch.no_grad():
        assert mixed.model(**batch).logits.dtype == torch.float32
    mixed_seen.compute.clear()
    handle = mixed.model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: mixed_seen.compute.add(out.dtype))
    with torch.no_grad():
        mixed.model(**batch)
    handle.remove()
    assert mixed_seen.compute == {torch.float32}


def test_32_true_is_bitwise_todays_training(no_native_bf16):
    default = train()
    assert default.precision == "32-true"
    for spec in ({"precision": "32-true"}, {"precision": "auto"}):  # auto without native bfloat16 is 32-true
        other = train(**spec)
        assert other.precision == "32-true"
        assert other.history == default.history
        for name, tensor in lora_state(default).items():
            assert torch.equal(lora_state(other)[name], tensor), name


def test_a_bad_precision_is_a_one_line_error_naming_the_valid_values(tmp_path, capsys):
    with pytest.raises(EmlocError) as error:
        RunConfig.from_dict({"lora": {"precision": "bf16"}})
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message == "lora.precision = 'bf16' is unknown: use '32-true', 'bf16-mixed' or 'auto'"
    assert RunConfig().lora.precision == PRECISIONS[0] == "32-true"
    assert cli.main(["run", "--out", str(tmp_path / "r"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--precision" in err and "bf16-mixed" in err, err
    config = tmp_path / "bad.yaml"
    config.write_text("lora: {precision: 16-mixed}\n", encoding="utf-8")
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "lora.precision = '16-mixed'" in err, err
    args = cli.parser().parse_args(["run", "--out", "r", "--precision", "BF16-Mixed"])
    assert cli.config_from_args(args).lora.precision == "bf16-mixed"


FINGERPRINTS_BEFORE = {"train_emulator": "517bd1033989ae7a", "train_original": "25d3f05fa05dc810"}
"""The default RunConfig's fingerprints before ``lora.precision`` existed."""


def test_the_default_keeps_the_fingerprints_runs_had_before(no_native_bf16):
    from emloc.families import with_resolved_targets
    base = with_resolved_targets(RunConfig())  # as a run sees it: automatic targets resolved
    for stage, before in FINGERPRINTS_BEFORE.items():
        assert fingerprint(base, stage) == before
    explicit, auto, mixed = (with_resolved_targets(RunConfig.from_dict({"lora": {"precision": precision}}))
                             for precision in ("32-true", "auto", "bf16-mixed"))  # auto: 32-true on this CPU
    for stage in STAGES:
        same = fingerprint(base, stage.name)
        assert fingerprint(explicit, stage.name) == fingerprint(auto, stage.name) == same
        # the adapter differs, so every stage that reads the lora section changes
        covers_lora = stage.config is None or "lora" in stage.config
        assert (fingerprint(mixed, stage.name) != fingerprint(base, stage.name)) == covers_lora, stage.name


def test_auto_is_fingerprinted_as_what_it_resolves_to(native_bf16):
    auto = RunConfig.from_dict({"lora": {"precision": "auto"}})
    mixed = RunConfig.from_dict({"lora": {"precision": "bf16-mixed"}})
    assert fingerprint(auto, "train_emulator") == fingerprint(mixed, "train_emulator")
    assert fingerprint(auto, "train_emulator") != FINGERPRINTS_BEFORE["train_emulator"]


def test_emloc_train_with_precision_records_it_and_auto_reuses_only_on_like_hardware(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(tiny_run_config(tiny_model_dir).to_dict()), encoding="utf-8")
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AMX-BF16"])
    argv = ["train", "--out", str(out), "--config", str(config), "--on", "original"]
    assert cli.main([*argv, "--precision", "auto"]) == 0
    assert "lora.precision auto -> bf16-mixed: the CPU has AMX-BF16" in capsys.readouterr().out
    summary = json.loads((out / "training" / "full_lora.json").read_text(encoding="utf-8"))
    assert summary["precision"] == "bf16-mixed"
    auto = tiny_run_config(tiny_model_dir, lora={"precision": "auto"})
    mixed = tiny_run_config(tiny_model_dir, lora={"precision": "bf16-mixed"})
    assert pipeline.Run(out, mixed, progress=False).is_done("train_original")  # same adapter and fingerprint
    assert pipeline.Run(out, auto, progress=False).is_done("train_original")
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])  # the run moved to a CPU without bf16
    assert not pipeline.Run(out, auto, progress=False).is_done("train_original")
    assert not pipeline.Run(out, tiny_run_config(tiny_model_dir), progress=False).is_done("train_original")


def test_training_leaves_busy_cpus_to_other_work():
    from emloc.precision import threads_beside
    assert threads_beside(None, 2, 2) == 2            # cannot tell: as configured
    assert threads_beside(0.1, 2, 2) == 2             # idle machine
    assert threads_beside(1.0, 2, 2) == 1             # a neighbour holds one core
    assert threads_beside(2.0, 2, 2) == 1             # never fewer than one
    assert threads_beside(1.6, 8, 8) == 6


def test_threads_for_training_follows_the_load_and_restores(monkeypatch, capsys):
    import torch

    from emloc import precision
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(precision.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(precision, "busy_cpus", lambda: 1.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with precision.threads_for_training() as chosen:
            assert chosen == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        assert "other work keeps 1.0 of 2 CPUs busy: training on 1 of 2 threads" in capsys.readouterr().err
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose: kept
        with precision.threads_for_training() as chosen:
            assert chosen == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_cpus_reads_the_machine():
    from emloc.precision import busy_cpus
    busy = busy_cpus(0.05)
    assert busy is None or 0.0 <= busy <= (__import__("os").cpu_count() or 1)
