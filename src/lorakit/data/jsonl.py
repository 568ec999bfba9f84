"""Read and write JSONL data files: one example a line, every bad line named as ``path:line:``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorakit.data.example import Example
from lorakit.data.schema import InvalidRecord, example_to_json, parse_record
from lorakit.errors import DataError

__all__ = ["example_to_json", "load_jsonl", "save_jsonl"]


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read every example of a JSONL file; blank lines are skipped.

    The first bad line stops the load with ``DataError("path:LINE: what is wrong")`` (lines count
    from 1): bytes that are not UTF-8, invalid JSON, a value that is not an object, duplicate or
    unknown keys, both or neither of the two forms, wrong types, an empty completion, empty
    messages, an unknown role, no assistant turn. A file with no example at all is an error too.
    A UTF-8 byte order mark at the start of the file is ignored.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the data file ({error.strerror or error})") from error
    data = data.removeprefix(b"\xef\xbb\xbf")
    examples = [
        _parse_line(path, number, raw)
        for number, raw in enumerate(data.split(b"\n"), start=1)
        if raw.strip()
    ]
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return examples


def save_jsonl(path: str | os.PathLike[str], examples: Iterable[Example]) -> None:
    """Write ``examples`` as JSONL, atomically: a temporary sibling file renamed over ``path``.

    Each example is checked first, so that the file always loads back with :func:`load_jsonl`
    (an invalid example raises :class:`DataError` naming its index, and nothing is written).
    """
    lines = [_dump_example(index, example) for index, example in enumerate(examples)]
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.writelines(line + "\n" for line in lines)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _parse_line(path: str | os.PathLike[str], number: int, raw: bytes) -> Example:
    """Decode and check one non-blank line."""
    try:
        return parse_record(_decode(raw))
    except InvalidRecord as error:
        raise DataError(f"{path}:{number}: {error}") from None


def _decode(raw: bytes) -> Any:
    """Bytes of one line -> a JSON value, or :class:`InvalidRecord` saying why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRecord(f"invalid UTF-8 at byte {error.start} of the line") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise InvalidRecord(f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise InvalidRecord("invalid JSON: nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, refusing a key given twice (``json`` would keep the last silently)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidRecord(f"duplicate key {key!r}")
        result[key] = value
    return result


def _dump_example(index: int, example: Example) -> str:
    """One example as a JSON line, checked against the schema the loader applies."""
    record = example_to_json(example)
    try:
        parse_record(record)
    except InvalidRecord as error:
        raise DataError(f"cannot save example {index}: {error}") from None
    return json.dumps(record, ensure_ascii=False)
