"""Command-line flags generated from a config dataclass, so that the CLI cannot drift from the library.

One flag per field (less ``exclude``), spelled ``--field-name`` unless ``spellings`` says otherwise; its
help is the field's docstring and its default the field's default, or the command line's own where
:data:`lorakit.cli.defaults.CLI_DEFAULTS` names one (``--help`` then shows both). How a value is read
follows the field's type: ``bool`` is a ``--flag`` / ``--no-flag`` pair, ``int`` / ``float`` / ``str`` one
value (``none`` for a field that may be None), ``tuple[str, ...]`` a comma-separated list, ``Mapping`` a
repeatable ``KEY=VALUE``; ``parsers`` reads the fields no rule covers.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorakit.cli.defaults import CLI_DEFAULTS
from lorakit.cli.values import comma_list, key_value, optional, scalar


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right below it in the class body) as one line of plain text."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for statement, following in zip(body, body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            text = re.sub(r":\w+:`~?([^`]*)`", r"\1", following.value.value).replace("``", "")
            docs[statement.target.id] = " ".join(text.split())
    return docs


def _shown(value: Any) -> str:
    """How ``--help`` writes a default ("" when there is none to show: None, an empty list)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, Mapping):
        return ",".join(f"{key}={item}" for key, item in value.items())
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else "" if value is None else str(value)


@dataclass(frozen=True)
class ConfigFlags:
    """The flags of one config dataclass on a command (see the module docstring)."""

    config: type
    exclude: tuple[str, ...] = ()
    spellings: Mapping[str, str] = field(default_factory=dict)
    parsers: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    """Per field no type rule covers: what reads its text; the first line of its docstring (how a value is
    written) goes into the flag's help."""
    choices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Per field: the allowed values, each with one line that ``--help`` shows."""

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.config) if f.name not in self.exclude]

    def flag(self, name: str) -> str:
        """The spelling of field ``name``'s flag."""
        return self.spellings.get(name, "--" + name.replace("_", "-"))

    def default(self, name: str) -> Any:
        """The flag's default: the command line's own (:data:`CLI_DEFAULTS`) or the dataclass field's."""
        return CLI_DEFAULTS.get(self.config, {}).get(name, self.library_default(name))

    def library_default(self, name: str) -> Any:
        """The dataclass field's own default (what a Python caller gets)."""
        spec = next(f for f in dataclasses.fields(self.config) if f.name == name)
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default

    def add(self, parser: argparse.ArgumentParser) -> None:
        """Add the flags to ``parser``, in one group named after the config."""
        docs = field_docs(self.config)
        hints = typing.get_type_hints(self.config)
        summary = " ".join(inspect.cleandoc(self.config.__doc__).split("\n\n")[0].split())
        group = parser.add_argument_group(self.config.__name__, summary)
        for spec in self.fields():
            if spec.name not in docs:
                raise TypeError(f"{self.config.__name__}.{spec.name} has no docstring to show as its help")
            reading, written = self._reading(spec.name, hints[spec.name])
            action = group.add_argument(self.flag(spec.name), dest=spec.name, default=self.default(spec.name),
                                        **reading)
            action.help = self._help(spec.name, docs[spec.name], written).replace("%", "%%")  # no argparse suffix

    def _help(self, name: str, doc: str, written: str | None = None) -> str:
        """``doc``, the choices, how the value is ``written`` and the default (the command line's and the
        library's where they differ)."""
        if name in self.choices:
            doc += " " + "; ".join(f"{key}: {line}" for key, line in self.choices[name].items()) + "."
        default, notes = _shown(self.default(name)), [written] if written else []
        if name in CLI_DEFAULTS.get(self.config, {}):
            notes.append(f"default: {default}; {self.config.__name__}'s: {_shown(self.library_default(name))}")
        elif default:
            notes.append(f"default: {default}")
        return f"{doc} ({'; '.join(notes)})" if notes else doc

    def _reading(self, name: str, hint: Any) -> tuple[dict[str, Any], str | None]:
        """``add_argument`` keywords that read a value of type ``hint``, and how the value is written."""
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        may_be_none = type(None) in members
        kind = next(m for m in members if m is not type(None)) if len(members) - may_be_none == 1 else None
        written = "none for None" if may_be_none and self.default(name) is not None else None
        if name in self.parsers:
            read = self.parsers[name]
            if not read.__doc__:
                raise TypeError(f"{self.config.__name__}.{name}: its parser needs a docstring (how a value is written)")
            written = read.__doc__.split("\n")[0]
        elif kind is bool:
            return {"action": argparse.BooleanOptionalAction}, None
        elif kind in (int, float, str):
            read = kind
        elif typing.get_origin(kind) is tuple:
            read, written = comma_list, "comma-separated"
        elif typing.get_origin(kind) is Mapping:
            value_type = typing.get_args(kind)[1]
            read_value = scalar if value_type is Any else value_type
            return {"action": KeyValues, "metavar": "KEY=VALUE", "type": key_value(read_value)}, "repeatable"
        else:
            raise TypeError(f"{self.config.__name__}.{name}: no rule reads {hint}; give ConfigFlags a parser for it")
        if name in self.choices:
            return {"type": read, "choices": list(self.choices[name])}, None
        return {"type": optional(read) if may_be_none else read}, written

    def build(self, args: argparse.Namespace):
        """The config from the parsed flags."""
        return self.config(**{spec.name: getattr(args, spec.name) for spec in self.fields()})


class KeyValues(argparse.Action):
    """A repeatable ``KEY=VALUE`` flag collected into a dict (a later KEY wins)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        key, value = values
        setattr(namespace, self.dest, {**getattr(namespace, self.dest), key: value})
