"""Data: JSONL examples, chat formatting and label masks, batching and packing, built-in tasks."""

from lorakit.data.batching import Batches, Position, batch_order, collate
from lorakit.data.encoding import IGNORE_INDEX, Encoded, encode, prompt_ids
from lorakit.data.example import Example, Message
from lorakit.data.formatting import prompt_text, use_chat
from lorakit.data.jsonl import example_to_json, load_jsonl, save_jsonl
from lorakit.data.packing import Pack, collate_packed, pack
from lorakit.data.source import load_examples
from lorakit.data.tasks import Task, get_task, task_names

__all__ = [
    "IGNORE_INDEX",
    "Batches",
    "Encoded",
    "Example",
    "Message",
    "Pack",
    "Position",
    "Task",
    "batch_order",
    "collate",
    "collate_packed",
    "encode",
    "example_to_json",
    "get_task",
    "load_examples",
    "load_jsonl",
    "pack",
    "prompt_ids",
    "prompt_text",
    "save_jsonl",
    "task_names",
    "use_chat",
]
