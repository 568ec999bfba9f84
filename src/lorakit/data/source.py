"""``load_examples(spec)``: examples from a JSONL file or a built-in task, by one string."""

from __future__ import annotations

from pathlib import Path

from lorakit.data.example import Example
from lorakit.data.jsonl import load_jsonl
from lorakit.data.tasks import SPLITS, get_task, task_names
from lorakit.errors import DataError

TASK_PREFIX = "task:"
#: How many examples ``task:NAME`` gives when no ``n`` is passed.
DEFAULT_TASK_EXAMPLES = 1000


def load_examples(spec: str, *, split: str = "train", n: int | None = None) -> list[Example]:
    """Load examples from ``spec``: a JSONL file path, or ``task:NAME`` for a built-in task.

    For a task, ``split`` picks the train or test split and ``n`` the number of examples
    (``DEFAULT_TASK_EXAMPLES`` when ``None``). For a file, ``split`` is not used (a file is its own
    split) and ``n`` keeps the first ``n`` examples (``None``: all; more than the file holds is an
    error). Anything else raises :class:`DataError` saying what a spec can be.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if n is not None and n < 0:
        raise DataError(f"n must be a number of examples >= 0 or None, got {n}")
    if spec.startswith(TASK_PREFIX):
        task = get_task(spec.removeprefix(TASK_PREFIX))
        return task.examples(split, DEFAULT_TASK_EXAMPLES if n is None else n)
    if not Path(spec).is_file():
        raise DataError(
            f"data spec {spec!r} is neither an existing file nor task:NAME (known tasks: "
            f"{', '.join(task_names())})"
        )
    examples = load_jsonl(spec)
    if n is None:
        return examples
    if n > len(examples):
        raise DataError(f"{spec}: asked for the first {n} examples, the file holds {len(examples)}")
    return examples[:n]
