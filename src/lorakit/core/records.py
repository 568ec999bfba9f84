"""What a forward records for the losses that read it (MixLoRA's router logits, MeteoRA's gate logits).

A module inside the model calls ``record(key, value)`` during its forward; a caller that wants those
values runs the forward inside ``with recording() as records:`` and hands ``records`` on with the
outputs (``SupervisedLogits.records``). Nothing is stored on a module, and outside a ``recording``
block ``record`` keeps nothing, so inference holds no extra tensors. The active record is a context
variable, so nested or concurrent forwards (threads, asyncio tasks) each get their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

Records = dict[str, list[Any]]

_active: ContextVar[Records | None] = ContextVar("lorakit_records", default=None)


def record(key: str, value: Any) -> None:
    """Append ``value`` under ``key`` to the innermost active :func:`recording`, if there is one."""
    records = _active.get()
    if records is not None:
        records.setdefault(key, []).append(value)


@contextlib.contextmanager
def recording() -> Iterator[Records]:
    """Collect what forwards inside the block :func:`record`, in call order, by key."""
    records: Records = {}
    token = _active.set(records)
    try:
        yield records
    finally:
        _active.reset(token)
