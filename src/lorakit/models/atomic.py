"""Build a directory atomically: fill a temporary sibling, then rename it into place."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Create the directory ``target`` by calling ``build(tmp)`` on an empty temporary sibling.

    Readers only ever see ``target`` missing or complete: the files are flushed to disk and the
    directory is renamed into place in one step, so an interrupted build leaves at most a hidden
    ``.<name>.tmp-*`` sibling that nothing reads (and is removed here unless the process was
    killed outright). When another process renamed its own build into place first, its directory
    is kept and this one is discarded. Returns ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, unlike mkdtemp, honours the umask: the cache may be shared between users.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        _flush_files(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            # A concurrent builder won the race: its complete directory stays, ours goes.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _flush_files(directory: Path) -> None:
    """fsync each file under ``directory``: a crash after the rename must not leave empty files."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
