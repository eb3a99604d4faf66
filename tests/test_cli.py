"""The CLI's config flags come from one table: each maps to a real RunConfig field of the right type."""
import argparse

import pytest

from emloc import cli
from emloc.arguments import lower_case
from emloc.config import EMULATOR_METHODS, RunConfig
from emloc.errors import EmlocError
from emloc.stages import STAGES

SAMPLE = {int: 4, float: 0.25, bool: True}  # 4: also a divisor of the batch (micro batch)
"""A value of each field type that the flag accepts; strings are per field (the config validates them)."""
TEXT = {"model": "some/model", "data.path": "mine.jsonl", "data.task": "arithmetic", "device": "cpu",
        "dtype": "bfloat16", "memory_budget": "2GB"}


def _lookup(config: RunConfig, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _stage_parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("flag", cli.FLAGS, ids=lambda f: f.name)
def test_every_flag_maps_to_a_run_config_field_of_its_type(flag):
    kind = cli.field_type(flag.field)
    default = _lookup(RunConfig(), flag.field)
    assert default is None or isinstance(default, kind)  # the dataclass default agrees with the annotation
    action = next(a for a in _stage_parser("run")._actions if flag.name in a.option_strings)
    assert action.dest == flag.dest and action.default is None  # an absent flag overrides nothing
    if kind is bool:
        assert action.const is True and action.type is None
    else:  # choices are read case-insensitively (--allocation Global), into the field's type
        assert action.type is (lower_case if flag.choices else kind)
        assert not flag.choices or kind is str
    value = flag.choices[-1] if flag.choices else TEXT[flag.field] if kind is str else SAMPLE[kind]
    args = argparse.Namespace(**{f.dest: None for f in cli.FLAGS} | {flag.dest: value})
    overrides = cli.flag_overrides(args)
    assert _lookup(RunConfig.from_dict(overrides), flag.field) == value


def test_flags_are_unique_and_every_stage_command_has_them():
    assert len({f.name for f in cli.FLAGS}) == len(cli.FLAGS) and len({f.field for f in cli.FLAGS}) == len(cli.FLAGS)
    for command in ["run", *dict.fromkeys(s.cli_command for s in STAGES)]:
        options = {o for a in _stage_parser(command)._actions for o in a.option_strings}
        assert {f.name for f in cli.FLAGS} <= options, command


def test_method_choices_come_from_the_config_lists():
    choices = {f.field: f.choices for f in cli.FLAGS if f.choices}
    assert choices["emulator.method"] == EMULATOR_METHODS
    for method in choices["correction.method"]:  # every offered choice is one the config accepts ...
        assert RunConfig.from_dict({"correction": {"method": method}}).correction.method == method
    with pytest.raises(EmlocError, match="correction.method"):  # ... and the validation is what limits them
        RunConfig.from_dict({"correction": {"method": "not_a_method"}})


def test_a_flag_naming_no_field_is_refused():
    with pytest.raises(EmlocError, match="no field 'lora.rank'"):
        cli.field_type("lora.rank")
    with pytest.raises(EmlocError, match="no field 'seed.x'"):
        cli.field_type("seed.x")


def test_precedence_stored_config_file_preset_flags_and_clamp_zero(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 5\nlora: {steps: 7, r: 4}\n", encoding="utf-8")
    parse = lambda *argv: cli.config_from_args(cli.parser().parse_args(["train", "--out", str(out), *argv]))
    stored = parse()
    assert (stored.seed, stored.lora.steps, stored.lora.r) == (5, 7, 4)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lora: {steps: 9}\ncorrection: {clamp: 2.0}\n", encoding="utf-8")
    from_file = parse("--config", str(config_file))  # the file replaces the stored config
    assert (from_file.seed, from_file.lora.steps, from_file.lora.r) == (0, 9, 8)
    preset = parse("--config", str(config_file), "--preset", "quick")
    assert preset.lora.steps == 15 and preset.correction.clamp == 2.0
    flags = parse("--config", str(config_file), "--preset", "quick", "--steps", "3", "--clamp", "0", "--rslora")
    assert flags.lora.steps == 3 and flags.correction.clamp is None and flags.lora.use_rslora is True
    assert parse("--clamp", "1.5").correction.clamp == 1.5
