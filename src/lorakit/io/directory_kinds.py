"""The registry of directory kinds: what :func:`lorakit.load` can read, and how each kind is found.

A directory lorakit writes names its kind in ``lorakit.json`` (:mod:`lorakit.io.metadata`); the entry
registered under that name loads it. Directories without the file (a foreign PEFT adapter, a Hugging Face
model, what lorakit 0.1 wrote) are recognised by each kind's own metadata fields (``recognise``), in the
order the kinds were registered. Each kind registers itself from its own package: ``adapter`` and
``model`` in :mod:`lorakit.io`, the mixtures in ``lorakit.mixtures.*`` (``import lorakit`` imports them
all); later packages (quantized bases, served or generated adapters) add theirs the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import ConfigError, FormatError
from lorakit.io.files import load_json
from lorakit.io.metadata import METADATA_FILE, read_metadata


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """What :func:`lorakit.load` read: a model to run, and what the directory added to its base."""

    kind: str
    """The directory's kind (``"adapter"``, ``"model"``, ``"xlora"``, ``"mixlora"``, ``"meteora"``, ...)."""
    path: Path
    model: nn.Module
    """What to run: the base with the directory's adapters, a mixture wrapping it, or a whole model."""
    base: nn.Module
    """The model the adapters live in (``model`` itself unless a mixture wraps it)."""
    tokenizer: Any | None
    """The tokenizer of the base ``load`` read itself; None when the caller passed the model."""
    adapters: tuple[str, ...] = ()
    """The names of the adapters the directory added to ``base``, in order."""


Load = Callable[[Path, nn.Module | None], Loaded]


def has_field(file_name: str, key: str) -> Callable[[Path], bool]:
    """A ``recognise`` for a directory whose JSON file ``file_name`` has the field ``key`` (PEFT's
    ``peft_type``, Hugging Face's ``model_type``, the mixture configs lorakit 0.1 wrote)."""
    def recognise(directory: Path) -> bool:
        path = directory / file_name
        return path.is_file() and key in load_json(path)
    return recognise


@dataclass(frozen=True, kw_only=True)
class DirectoryKind:
    """One kind of directory: how to load it, describe it and recognise it without ``lorakit.json``."""

    name: str
    holds: str
    """What such a directory is, for messages (``"a LoRA adapter in the PEFT format"``)."""
    load: Load
    """``load(directory, model)``: into ``model``, or (None) into the base the directory records."""
    describe: Callable[[Path], dict[str, Any]]
    """What the directory holds, from its files alone (``lorakit inspect``); JSON-serialisable."""
    recognise: Callable[[Path], bool] | None = None
    """Whether a directory without ``lorakit.json`` is of this kind, from its own metadata fields."""
    recognised_by: str = ""
    """What ``recognise`` looks for, for the error when no kind recognises a directory."""
    routed: str | None = None
    """How the kind mixes its adapters per token (``"its experts are mixed per token"``): it is no fixed
    weight update, so ``merge`` and ``analyze`` refuse it, saying this. None for a fixed update."""
    whole_model: bool = False
    """Whether the directory is a whole model (no adapter to merge into a base)."""


_KINDS: dict[str, DirectoryKind] = {}


def register_kind(kind: DirectoryKind) -> DirectoryKind:
    """Add ``kind`` to the registry; a name is registered once."""
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ConfigError(f"a directory kind named {kind.name!r} is registered already; choose another name")
    _KINDS[kind.name] = kind
    return kind


def kind_names() -> list[str]:
    """The registered kinds, in registration order."""
    return list(_KINDS)


def get_kind(name: str) -> DirectoryKind:
    """The kind registered as ``name``; a :class:`ConfigError` lists the known ones."""
    if name not in _KINDS:
        raise ConfigError(f"unknown directory kind {name!r}; known kinds: {', '.join(_KINDS)}")
    return _KINDS[name]


def directory_kind(path: str | Path) -> DirectoryKind:
    """The kind of the directory at ``path``: its ``lorakit.json``, else the first kind recognising it.

    A :class:`FormatError` says what the directory holds and what was expected."""
    directory = Path(path)
    if not directory.is_dir():
        raise FormatError(f"{directory}: no such directory")
    metadata = read_metadata(directory)
    if metadata is not None:
        if metadata.kind not in _KINDS:
            raise FormatError(f"{directory} holds {METADATA_FILE} with kind {metadata.kind!r}; known kinds: "
                              f"{', '.join(_KINDS)}")
        return _KINDS[metadata.kind]
    for kind in _KINDS.values():
        if kind.recognise is not None and kind.recognise(directory):
            return kind
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    expected = "; ".join(f"{k.recognised_by} ({k.holds})" for k in _KINDS.values() if k.recognise is not None)
    raise FormatError(f"{directory} holds no {METADATA_FILE} and none of: {expected}; it holds "
                      f"{', '.join(found[:8]) + (', ...' if len(found) > 8 else '') if found else 'nothing'}: "
                      "not a lorakit, PEFT or model directory")
