"""Reading and writing weight files safely: atomic writes, no pickle unless asked, clear errors."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.errors import FormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A failure (or a kill) before the rename leaves any previous ``path`` untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600, and the rename would keep that mode, leaving saved
    # adapters unreadable to other users (a serving process). os.open with 0o666 honours the umask; the
    # mode is put back after writing because some writers (safetensors' save_file) recreate the file 0600.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and move ``tmp`` onto ``path`` only once it is complete."""
    write_all_atomically({path: write})


def write_all_atomically(writes: Mapping[Path, Callable[[Path], None]]) -> None:
    """Write every file to a temporary beside it first; rename them into place only once all are complete.

    A failure in any write leaves every previous file untouched, so files that belong together (an
    adapter's config and weights) are never left half old, half new.
    """
    with ExitStack() as stack:
        for path, write in writes.items():
            write(stack.enter_context(atomic_path(path)))


def tensor_writer(tensors: Mapping[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> Callable[[Path], None]:
    """A writer of ``tensors`` as safetensors (contiguous CPU copies; PEFT's ``format: pt`` metadata)."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(data, str(tmp), metadata={"format": "pt", **(metadata or {})})


def json_writer(obj: Any) -> Callable[[Path], None]:
    """A writer of ``obj`` as indented, key-sorted JSON."""
    return lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors, atomically (contiguous CPU copies; PEFT's ``format: pt`` metadata)."""
    write_atomically(path, tensor_writer(tensors, metadata))


def save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    write_atomically(path, json_writer(obj))


def load_tensors(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a weight file; pickles only with ``allow_pickle`` (then with ``weights_only=True``).

    Every failure is a :class:`FormatError` naming the file: missing, truncated, corrupt, pickled.
    """
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FormatError(f"{path}: is a pickle file, which can run code when loaded; convert it to "
                              "safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)")
        return _load_pickle(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # the reader raises several types for corrupt input; all mean the same
        raise FormatError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors


def load_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none); a :class:`FormatError`
    names a missing or unreadable file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # the reader raises several types for corrupt input; all mean the same
        raise FormatError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


def load_metadata_header(path: Path, key: str, *, version: int, field: str, holds: str) -> dict[str, Any]:
    """``header[field]`` of the JSON header ``{"format": version, field: {...}}`` that the safetensors file
    ``path`` stores under metadata ``key``; a :class:`FormatError` names the file, the key and what is wrong
    (``holds`` says what a file without the key is not, e.g. "a lorakit quantized file")."""
    raw = load_metadata(path).get(key)
    if raw is None:
        raise FormatError(f"{path}: has no {key!r} metadata, so it is not {holds}")
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise FormatError(f"{path}: metadata {key!r} is not valid JSON ({err})") from None
    if not (isinstance(header, dict) and set(header) == {"format", field} and header["format"] == version
            and isinstance(header[field], dict)):
        raise FormatError(f"{path}: metadata {key!r} must be exactly {{'format': {version}, '{field}': {{...}}}}; "
                          f"found {raw[:200]}")
    return header[field]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FormatError(f"{path}: cannot be loaded with torch.load(weights_only=True) ({err})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a mapping of names to tensors")
    return obj


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON object; a :class:`FormatError` names the file and what is wrong."""
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, over-long integers, absurd nesting
        raise FormatError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a JSON {type(obj).__name__}, not an object")
    return obj
