"""``lorakit tasks list | export NAME``: the built-in tasks, and any of them as JSONL."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.common import command
from lorakit.data.jsonl import example_to_json
from lorakit.data.tasks import get_task, task_names
from lorakit.errors import LorakitError


def _tasks(args: argparse.Namespace) -> None:
    if args.action == "list":
        for name in task_names():
            print(f"{name}\t{get_task(name).description}")
        return
    if not args.name:
        raise LorakitError("lorakit tasks export needs a task NAME; see lorakit tasks list")
    for example in get_task(args.name).examples(args.split, args.n):
        print(json.dumps(example_to_json(example)))


def register(commands) -> None:
    tasks = command(commands, "tasks", _tasks, "List the built-in tasks, or export one as JSONL.", base=False)
    tasks.add_argument("action", choices=["list", "export"])
    tasks.add_argument("name", nargs="?", help="task name (for export)")
    tasks.add_argument("--split", default="train", choices=["train", "test"])
    tasks.add_argument("--n", type=int, default=100)
