"""Every ``lorakit`` command's parser, by its full name (``"xlora train"``), and the flags on it."""

from __future__ import annotations

import argparse

from lorakit.cli.main import build_parser


def command_parsers(parser: argparse.ArgumentParser | None = None,
                    prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """The leaf parsers under ``parser`` (the whole CLI by default)."""
    parser = parser or build_parser()
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        return {prefix.strip(): parser}
    return {name: sub for group in groups for child, choice in group.choices.items()
            for name, sub in command_parsers(choice, f"{prefix} {child}").items()}


def flag_spellings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` and the names of its positionals, sorted (``-h`` left out)."""
    names = set()
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            names.update(action.option_strings or [action.dest])
    return sorted(names)
