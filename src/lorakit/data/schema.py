"""The JSONL record schema: a decoded JSON value -> :class:`Example`, and back.

A record is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role": ..., "content":
...}, ...]}``, either with an optional ``"task": str``. :func:`parse_record` checks one decoded
value and says exactly what is wrong; :func:`example_to_json` is its inverse.
"""

from __future__ import annotations

from typing import Any

from lorakit.data.example import Example, Message

ROLES = ("system", "user", "assistant")
KEYS = ("prompt", "completion", "messages", "task")
MESSAGE_KEYS = ("role", "content")


class InvalidRecord(ValueError):
    """One record is malformed; the message says what is wrong (the caller adds where)."""


def parse_record(value: Any) -> Example:
    """Turn one decoded JSON value into an :class:`Example`, or raise :class:`InvalidRecord`."""
    if not isinstance(value, dict):
        raise InvalidRecord(f"expected a JSON object, got {_json_type(value)}")
    unknown = [key for key in value if key not in KEYS]
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        raise InvalidRecord(f"unknown key(s) {names} (allowed: {', '.join(KEYS)})")
    task = value.get("task")
    if "task" in value:
        _check_string("'task'", task)
    has_pair = "prompt" in value or "completion" in value
    if has_pair and "messages" in value:
        raise InvalidRecord("has both prompt/completion and messages; use one form per line")
    if "messages" in value:
        return Example(messages=_parse_messages(value["messages"]), task=task)
    if not has_pair:
        raise InvalidRecord("has neither prompt/completion nor messages")
    return _parse_pair(value, task)


def example_to_json(example: Example) -> dict[str, Any]:
    """Return the JSON object that :func:`parse_record` reads back as ``example``."""
    record: dict[str, Any]
    if example.messages is not None:
        record = {"messages": [{"role": m.role, "content": m.content} for m in example.messages]}
        if example.prompt is not None or example.completion is not None:
            record |= {"prompt": example.prompt, "completion": example.completion}
    else:
        record = {"prompt": example.prompt, "completion": example.completion}
    if example.task is not None:
        record["task"] = example.task
    return record


def _parse_pair(value: dict[str, Any], task: str | None) -> Example:
    """Check the prompt/completion form."""
    for key in ("prompt", "completion"):
        if key not in value:
            other = "completion" if key == "prompt" else "prompt"
            raise InvalidRecord(f"has {other!r} but no {key!r}")
        _check_string(repr(key), value[key])
    if not value["completion"]:
        raise InvalidRecord("'completion' is empty: there would be nothing to learn")
    return Example(prompt=value["prompt"], completion=value["completion"], task=task)


def _parse_messages(value: Any) -> tuple[Message, ...]:
    """Check the messages form: a non-empty list of turns with at least one assistant turn."""
    if not isinstance(value, list):
        raise InvalidRecord(f"'messages' must be a list, got {_json_type(value)}")
    if not value:
        raise InvalidRecord("'messages' is empty")
    messages = tuple(_parse_message(index, turn) for index, turn in enumerate(value))
    if not any(message.role == "assistant" for message in messages):
        raise InvalidRecord("'messages' has no assistant turn: there would be nothing to learn")
    return messages


def _parse_message(index: int, turn: Any) -> Message:
    """Check one chat turn, ``messages[index]``."""
    where = f"messages[{index}]"
    if not isinstance(turn, dict):
        raise InvalidRecord(f"{where} must be an object, got {_json_type(turn)}")
    unknown = [key for key in turn if key not in MESSAGE_KEYS]
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        raise InvalidRecord(f"{where} has unknown key(s) {names} (allowed: role, content)")
    for key in MESSAGE_KEYS:
        if key not in turn:
            raise InvalidRecord(f"{where} has no {key!r}")
    role, content = turn["role"], turn["content"]
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRecord(f"{where} has unknown role {role!r} (allowed: {', '.join(ROLES)})")
    _check_string(f"{where}.content", content)
    if role == "assistant" and not content:
        raise InvalidRecord(f"{where} is an assistant turn with empty content")
    return Message(role=role, content=content)


def _check_string(what: str, value: Any) -> None:
    """Require a string that is valid Unicode (JSON escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        raise InvalidRecord(f"{what} must be a string, got {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRecord(f"{what} holds a lone surrogate at character {error.start}") from None


def _json_type(value: Any) -> str:
    """Name a decoded JSON value's type the way JSON does."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return names.get(type(value), type(value).__name__)
