"""How the command line reads the values of its flags: lists, ``KEY=VALUE`` settings, ``NAME=PATH`` pairs."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorakit.config import ALL_LINEAR
from lorakit.errors import ConfigError

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""What the left side of ``NAME=PATH`` must look like to be a name: no ``/``, ``:`` or ``=``."""


def optional(read: Callable[[str], Any]) -> Callable[[str], Any]:
    """``read``, except that ``none`` gives None (for a setting whose None means something)."""
    def read_optional(text: str) -> Any:
        return None if text.strip().lower() == "none" else read(text)
    read_optional.__name__ = read.__name__  # argparse names it in "invalid ... value"
    return read_optional


def scalar(text: str) -> bool | int | float | str:
    """``true`` / ``false``, an integer, a number, or else the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        number = float(text)
    except ValueError:
        return text.strip()
    return int(number) if number.is_integer() and "." not in text and "e" not in lowered else number


def key_value(read: Callable[[str], Any]) -> Callable[[str], tuple[str, Any]]:
    """``KEY=VALUE`` as ``(KEY, read(VALUE))``."""
    def read_pair(text: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
        return key.strip(), read(value)
    return read_pair


def comma_list(text: str) -> tuple[str, ...]:
    """``a,b,c`` as ``("a", "b", "c")``."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def module_names(text: str) -> str | tuple[str, ...]:
    """all-linear, re:REGEX or comma-separated module names

    ``all-linear`` as itself, ``re:REGEX`` as the regular expression, else a tuple of the names."""
    if text == ALL_LINEAR:
        return text
    return text[3:] if text.startswith("re:") else comma_list(text)


def split_name(text: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` as ``(NAME, VALUE)``, or ``(None, text)`` when the part before the first ``=`` is not a
    plain name (:data:`PLAIN_NAME`) or ``text`` as a whole is an existing path: ``runs/lr=1e-3/x.jsonl`` is
    a path, not the name ``runs/lr``."""
    name, sep, value = text.partition("=")
    if sep and PLAIN_NAME.fullmatch(name) and not Path(text).exists():
        return name, value
    return None, text


def named_values(texts: Sequence[str], flag: str, what: str = "DIR") -> dict[str, str]:
    """Every ``NAME=VALUE`` of a repeated ``flag`` as a dict, in order; each must be named, each name once."""
    named: dict[str, str] = {}
    for text in texts:
        name, value = split_name(text)
        if name is None or not value:
            raise ConfigError(f"{flag} {text!r} is not NAME={what}")
        if name in named:
            raise ConfigError(f"{flag} names {name!r} twice: names may not repeat")
        named[name] = value
    return named
