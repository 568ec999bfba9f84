"""Writing one GGUF file: never over an existing file unless asked, and atomically (a temporary file beside the
target, renamed over it once complete), so an interrupted export leaves no partial file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf

from lorakit.errors import ConfigError
from lorakit.io.files import atomic_path


def refuse_existing(out: Path, *, force: bool) -> None:
    """Refuse ``out`` when it exists (a directory always; a file unless ``force``)."""
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; the GGUF export writes one file (name it, e.g. {out / 'model.gguf'})")
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force (force=True) to replace it")


def write_gguf(out: Path, architecture: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    """Write the GGUF file ``out`` for ``architecture``: ``fill(writer)`` adds the metadata and tensors, then
    the header, the metadata and the tensor data are written, and the file is renamed into place."""
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out
