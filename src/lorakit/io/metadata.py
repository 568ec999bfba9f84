"""``lorakit.json``: what kind of directory lorakit wrote, so that :func:`lorakit.load` knows how to read it.

    {"format": 1, "kind": "adapter"}
    {"format": 1, "kind": "adapter", "origin": "dylora export at rank 4"}
    {"format": 1, "kind": "adapter", "base_quantization": "nf4"}

Every writer adds it in the same atomic group as its own files. ``kind`` names an entry of the registry
(:mod:`lorakit.io.directory_kinds`); ``origin``, when present, says which lorakit step wrote a directory
whose kind does not tell (a LoRA-GA or DyLoRA export is a plain adapter); ``base_quantization``, when present,
names the quantization of the base the adapter was trained on (``lorakit train --quantize nf4``), so that
loading it rebuilds that base. It is a file of its own, not a
field of ``adapter_config.json``: PEFT 0.21 drops unknown fields there with a warning, lorakit writes
exactly PEFT's fields (so vLLM and LoRAX read them as PEFT's), and mixture directories have no
``adapter_config.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import FormatError
from lorakit.io.files import json_writer, load_json

METADATA_FILE = "lorakit.json"
FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class Metadata:
    """The fields of ``lorakit.json``."""

    kind: str
    """The directory's kind: the registry entry that loads it."""
    origin: str | None = None
    """Which lorakit step wrote it, where the kind does not tell (e.g. ``"lora-ga export"``)."""
    base_quantization: str | None = None
    """The quantization of the base an adapter was trained on (``"nf4"``, ``"int8"``, ...); None: full precision."""


def metadata_writer(kind: str, origin: str | None = None,
                    base_quantization: str | None = None) -> Callable[[Path], None]:
    """A writer of ``lorakit.json`` for :func:`~lorakit.io.files.write_all_atomically`."""
    optional = {"origin": origin, "base_quantization": base_quantization}
    return json_writer({"format": FORMAT, "kind": kind, **{k: v for k, v in optional.items() if v is not None}})


def read_metadata(directory: Path) -> Metadata | None:
    """The ``lorakit.json`` of ``directory``; None when it has none (a foreign or a lorakit 0.1 directory).

    A damaged file is a :class:`FormatError` naming it, the field and what is allowed."""
    source = directory / METADATA_FILE
    if not source.exists():
        return None
    raw = load_json(source)
    if raw.get("format") != FORMAT:
        raise FormatError(f"{source}: 'format' is {raw.get('format')!r}; this lorakit reads format {FORMAT} "
                          "(a newer lorakit wrote it?)")
    kind = raw.get("kind")
    if not isinstance(kind, str) or not kind:
        raise FormatError(f"{source}: 'kind' is {kind!r}; the name of a directory kind is required")
    for field in ("origin", "base_quantization"):
        if raw.get(field) is not None and not isinstance(raw[field], str):
            raise FormatError(f"{source}: {field!r} is {raw[field]!r}; a string or no field is required")
    return Metadata(kind=kind, origin=raw.get("origin"), base_quantization=raw.get("base_quantization"))
