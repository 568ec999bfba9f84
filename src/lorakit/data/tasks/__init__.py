"""Built-in generated tasks with exact-match answers and disjoint train/test splits."""

from lorakit.data.tasks.base import LIMIT, SPLITS, Split, Task, split_of
from lorakit.data.tasks.registry import get_task, task_names

__all__ = ["LIMIT", "SPLITS", "Split", "Task", "get_task", "split_of", "task_names"]
