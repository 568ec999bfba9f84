"""The command line's defaults are the config dataclasses' (or the documented overrides of
``lorakit.cli.defaults``), as parsed and as ``--help`` shows them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lorakit.cli.common import LORA, TRAIN
from lorakit.cli.defaults import CLI_DEFAULTS
from lorakit.cli.flags import field_docs
from lorakit.cli.main import build_parser
from lorakit.config import LoraConfig, TrainConfig
from tests.cli.parsers import command_parsers

COMMANDS = command_parsers()
WITH_CONFIGS = sorted(name for name, parser in COMMANDS.items() if parser.get_default("config_flags"))


def field_default(cls: type, name: str):
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def shown(value) -> str:
    """A default as ``--help`` writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list, dict)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return action.help % {"default": action.default}


def test_the_commands_with_config_flags():
    assert {"train", "continual", "targets", "xlora train", "meteora train", "demo lora", "demo xlora",
            "demo mixtures", "demo intruders"} <= set(WITH_CONFIGS)


@pytest.mark.parametrize("name", WITH_CONFIGS)
def test_every_flag_defaults_to_its_field_or_the_documented_override(name):
    parser = COMMANDS[name]
    for flags in parser.get_default("config_flags"):
        overrides = CLI_DEFAULTS.get(flags.config, {})
        for spec in flags.fields():
            expected = overrides.get(spec.name, field_default(flags.config, spec.name))
            assert parser.get_default(spec.name) == expected, (name, spec.name)
            text = help_of(parser, flags.flag(spec.name))
            assert text.startswith(field_docs(flags.config)[spec.name][:20]), (name, spec.name)
            if spec.name in overrides:
                library = shown(field_default(flags.config, spec.name))
                assert f"(default: {shown(expected)}; {flags.config.__name__}'s: {library})" in text, (name, text)
            elif shown(expected):
                assert f"default: {shown(expected)})" in text, (name, spec.name, text)


def test_parsing_no_flags_gives_the_library_config_with_the_overrides_only():
    args = build_parser().parse_args(["train", "--data", "x.jsonl", "--out", "o"])
    assert LORA.build(args) == dataclasses.replace(LoraConfig(), rank=16, alpha=32.0)
    assert TRAIN.build(args) == TrainConfig(keep_freed_memory=True)


def test_the_overrides_are_real_fields_that_differ_from_the_library():
    assert CLI_DEFAULTS == {LoraConfig: {"rank": 16, "alpha": 32.0}, TrainConfig: {"keep_freed_memory": True}}
    for cls, overrides in CLI_DEFAULTS.items():
        for name, value in overrides.items():
            assert field_default(cls, name) != value, (cls.__name__, name)


@pytest.mark.parametrize("name", ["train", "continual", "xlora train", "meteora train"])
def test_every_training_command_keeps_freed_memory_unless_told_not_to(name):
    parser = COMMANDS[name]
    assert parser.get_default("keep_freed_memory") is True
    action = next(a for a in parser._actions if a.dest == "keep_freed_memory")
    assert action.option_strings == ["--keep-freed-memory", "--no-keep-freed-memory"]
    assert "(default: on; TrainConfig's: off)" in help_of(parser, "--keep-freed-memory")
    if name == "train":
        assert TRAIN.build(parser.parse_args(["--no-keep-freed-memory"])).keep_freed_memory is False


def test_every_train_config_field_is_a_flag_of_lorakit_train():
    """A field added to TrainConfig becomes a flag without touching the CLI."""
    flags = {s for a in COMMANDS["train"]._actions for s in a.option_strings}
    for spec in dataclasses.fields(TrainConfig):
        assert TRAIN.flag(spec.name) in flags, spec.name


def test_values_are_read_by_the_field_s_type():
    parser = COMMANDS["train"]
    args = parser.parse_args(["--max-grad-norm", "none", "--no-bucket", "--chat", "--targets", "q_proj, v_proj",
                              "--rank-pattern", "q_proj=4", "--rank-pattern", "v_proj=2", "--option", "a=1",
                              "--option", "b=x", "--option", "a=2.5", "--exclude", "re:.*o_proj", "--rslora"])
    lora, train = LORA.build(args), TRAIN.build(args)
    assert (train.max_grad_norm, train.bucket, train.chat) == (None, False, True)
    assert train.options == {"a": 2.5, "b": "x"}
    assert (lora.targets, lora.exclude, lora.use_rslora) == (("q_proj", "v_proj"), ".*o_proj", True)
    assert lora.rank_pattern == {"q_proj": 4, "v_proj": 2}
    assert TRAIN.build(parser.parse_args([])).options == {}  # the default dict is not shared between parses
    with pytest.raises(SystemExit):
        parser.parse_args(["--rank-pattern", "q_proj=four"])
