"""The built-in tasks by name: ``get_task("reverse")``, ``task_names()``."""

from __future__ import annotations

from lorakit.data.tasks.arithmetic import ADD, UNITS_TASK
from lorakit.data.tasks.base import Task
from lorakit.data.tasks.formats import DATE, SORT
from lorakit.data.tasks.recall import RECALL
from lorakit.data.tasks.strings import CAPS, COUNT, REVERSE
from lorakit.errors import DataError

TASKS: dict[str, Task] = {task.name: task for task in (ADD, REVERSE, SORT, DATE, UNITS_TASK, COUNT, CAPS,
                                                        RECALL)}


def task_names() -> list[str]:
    """The names of the built-in tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The built-in task called ``name``; an unknown name raises :class:`DataError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r} (known tasks: {', '.join(task_names())})") from None
