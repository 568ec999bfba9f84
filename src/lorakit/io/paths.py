"""Paths a directory records to other directories (a mixture's experts), so that moved runs still load.

A path is recorded relative to the recording directory when the target sits inside it or beside it (under
the same parent: ``experts/date``, ``../date``), so copying or moving the parent keeps it valid; any other
target is recorded absolute. Relative paths are resolved against the directory, never the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import FormatError


def portable_path(target: str | Path, directory: Path) -> str:
    """How ``directory`` records ``target``: relative when it is inside or beside ``directory``, else absolute."""
    target, home = Path(target).resolve(), directory.resolve()
    if target.is_relative_to(home.parent) and home.parent != home:
        return Path(os.path.relpath(target, home)).as_posix()
    return str(target)


def recorded_directory(recorded: str, directory: Path, *, what: str, source: Path) -> Path:
    """The directory ``recorded`` (by ``source``, a file of ``directory``) names; a missing one is a
    :class:`FormatError` naming ``what`` it is and where it was looked for."""
    path = Path(recorded)
    found = path if path.is_absolute() else directory / path
    if not found.is_dir():
        relative = "" if path.is_absolute() else f", recorded as {recorded!r} relative to {directory}"
        raise FormatError(f"{source}: {what} is missing: no such adapter directory at {found}{relative}")
    return found
