"""The flag generator on configs of its own: every field a flag, its docstring the help, its type the reading."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from lorakit.cli.flags import ConfigFlags, field_docs
from lorakit.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Toy:
    """A toy config.

    Its second paragraph."""

    size: int = 3
    """How big, in ``units`` (:mod:`lorakit.core`); 5% more is fine."""
    scale: float | None = 0.5
    """A scale, or None."""
    name: str | None = None
    """A name."""
    loud: bool = False
    """Shout."""
    names: tuple[str, ...] = ("a", "b")
    """Some names."""
    weights: Mapping[str, float] = field(default_factory=dict)
    """Weights by name."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"size={self.size!r} is invalid: a positive integer")


@dataclass(frozen=True, kw_only=True)
class Undocumented:
    """No field docstring."""

    size: int = 3


@dataclass(frozen=True, kw_only=True)
class Unreadable:
    """A field no rule reads."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    """Pairs."""


def parser_for(flags: ConfigFlags) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    flags.add(parser)
    return parser


def test_docstrings_are_read_from_the_source_as_plain_text():
    docs = field_docs(Toy)
    assert sorted(docs) == ["loud", "name", "names", "scale", "size", "weights"]
    assert docs["size"] == "How big, in units (lorakit.core); 5% more is fine."


def test_every_field_is_a_flag_with_its_default_and_reading():
    flags = ConfigFlags(Toy, spellings={"loud": "--shout"})
    parser = parser_for(flags)
    assert flags.build(parser.parse_args([])) == Toy()
    args = parser.parse_args(["--size", "7", "--scale", "none", "--name", "x", "--shout", "--names", "c,d",
                              "--weights", "w=0.25"])
    assert flags.build(args) == Toy(size=7, scale=None, name="x", loud=True, names=("c", "d"), weights={"w": 0.25})
    assert flags.build(parser.parse_args(["--shout", "--no-shout"])).loud is False
    help_text = parser.format_help()
    assert "How big, in units (lorakit.core); 5% more is fine. (default: 3)" in " ".join(help_text.split())
    assert "A scale, or None. (none for None; default: 0.5)" in " ".join(help_text.split())
    assert "Its second paragraph" not in help_text and "A toy config." in help_text


def test_a_bad_value_is_the_config_s_error_and_a_bad_type_argparse_s():
    flags = ConfigFlags(Toy)
    parser = parser_for(flags)
    with pytest.raises(ConfigError, match="size=0 is invalid"):
        flags.build(parser.parse_args(["--size", "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "big"])


def test_excluded_fields_get_no_flag_and_keep_their_default():
    flags = ConfigFlags(Toy, exclude=("names", "weights"))
    parser = parser_for(flags)
    with pytest.raises(SystemExit):
        parser.parse_args(["--names", "x"])
    assert flags.build(parser.parse_args([])).names == ("a", "b")


def test_a_field_without_docstring_or_rule_is_refused_when_the_parser_is_built():
    with pytest.raises(TypeError, match="Undocumented.size has no docstring"):
        parser_for(ConfigFlags(Undocumented))
    with pytest.raises(TypeError, match="Unreadable.pairs: no rule reads"):
        parser_for(ConfigFlags(Unreadable))
    with pytest.raises(TypeError, match="Unreadable.pairs: its parser needs a docstring"):
        parser_for(ConfigFlags(Unreadable, parsers={"pairs": lambda text: [(1, 2)]}))

    def pairs(text: str) -> list[tuple[int, int]]:
        """A:B,C:D"""
        return [tuple(int(n) for n in pair.split(":")) for pair in text.split(",")]

    flags = ConfigFlags(Unreadable, parsers={"pairs": pairs})
    parser = parser_for(flags)
    assert flags.build(parser.parse_args(["--pairs", "1:2,3:4"])).pairs == [(1, 2), (3, 4)]
    assert "Pairs. (A:B,C:D)" in parser.format_help()
