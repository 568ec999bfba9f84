"""JSONL loading and saving: every kind of bad line, round trips, and fuzzed input."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.data import Example, Message, load_jsonl, save_jsonl
from lorakit.errors import DataError

GOOD = b'{"prompt": "Add: 1 + 2", "completion": "3"}'
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def turn(role: object = "user", content: object = "hi", **extra: object) -> dict[str, object]:
    return {"role": role, "content": content, **extra}


def line(value: object) -> bytes:
    return json.dumps(value).encode()


BAD_LINES = {
    "invalid json": (b'{"prompt": "a", ', "invalid JSON"),
    "array": (b'["a"]', "expected a JSON object, got array"),
    "string": (b'"text"', "expected a JSON object, got string"),
    "number": (b"3", "expected a JSON object, got number"),
    "both forms": (line({"prompt": "a", "completion": "b"} | CHAT), "both prompt/completion and messages"),
    "neither form": (line({"task": "add"}), "neither prompt/completion nor messages"),
    "no prompt": (line({"completion": "b"}), "has 'completion' but no 'prompt'"),
    "no completion": (line({"prompt": "a"}), "has 'prompt' but no 'completion'"),
    "prompt number": (line({"prompt": 3, "completion": "b"}), "'prompt' must be a string, got number"),
    "completion null": (line({"prompt": "a", "completion": None}), "'completion' must be a string, got null"),
    "empty completion": (line({"prompt": "a", "completion": ""}), "'completion' is empty"),
    "task not string": (line({"prompt": "a", "completion": "b", "task": 1}), "'task' must be a string, got number"),
    "unknown keys": (line({"prompt": "a", "completion": "b", "answer": 1, "meta": {}}),
                     "unknown key(s) 'answer', 'meta'"),
    "duplicate key": (b'{"prompt": "a", "prompt": "b", "completion": "c"}', "duplicate key 'prompt'"),
    "messages object": (line({"messages": {"role": "user"}}), "'messages' must be a list, got object"),
    "empty messages": (line({"messages": []}), "'messages' is empty"),
    "turn not object": (line({"messages": ["hi"]}), "messages[0] must be an object, got string"),
    "unknown role": (line({"messages": [turn(), turn("tool")]}), "messages[1] has unknown role 'tool'"),
    "role number": (line({"messages": [turn(7)]}), "messages[0] has unknown role 7"),
    "no role": (line({"messages": [{"content": "x"}]}), "messages[0] has no 'role'"),
    "no content": (line({"messages": [{"role": "user"}]}), "messages[0] has no 'content'"),
    "content list": (line({"messages": [turn("assistant", ["x"])]}), "messages[0].content must be a string, got array"),
    "turn extra key": (line({"messages": [turn(name="bob")]}), "messages[0] has unknown key(s) 'name'"),
    "no assistant": (line({"messages": [turn("system", "be brief"), turn()]}), "no assistant turn"),
    "empty assistant": (line({"messages": [turn(), turn("assistant", "")]}),
                        "messages[1] is an assistant turn with empty content"),
    "invalid utf-8": (b'{"prompt": "caf\xe9", "completion": "b"}', "invalid UTF-8 at byte 15"),
    "lone surrogate": (b'{"prompt": "\\ud800", "completion": "b"}', "'prompt' holds a lone surrogate"),
    "nested too deeply": (b"[" * 200_000, "invalid JSON"),
}


@pytest.mark.parametrize("raw, reason", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_a_bad_line_names_file_line_and_reason(tmp_path: Path, raw: bytes, reason: str):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD + b"\n\n" + raw + b"\n" + GOOD + b"\n")
    with pytest.raises(DataError) as caught:
        load_jsonl(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: "), message
    assert reason in message


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\r\n\t\n"], ids=["empty", "newline", "blank lines"])
def test_an_empty_file_is_an_error(tmp_path: Path, content: bytes):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: no examples"):
        load_jsonl(path)


def test_a_missing_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_both_forms_load_with_blank_lines_crlf_and_bom(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    chat = line(CHAT | {"task": "greet"})
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n\r\n" + chat + b"\r\n")
    assert load_jsonl(path) == [
        Example(prompt="Add: 1 + 2", completion="3"),
        Example(messages=(Message("user", "hi"), Message("assistant", "hello")), task="greet"),
    ]


def test_save_is_atomic_and_refuses_invalid_examples(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    good = [Example(prompt="p", completion="c", task="t")]
    save_jsonl(path, good)
    with pytest.raises(DataError, match="cannot save example 1: 'completion' is empty"):
        save_jsonl(path, good + [Example(prompt="p", completion="")])
    assert load_jsonl(path) == good  # the earlier file is intact
    assert os.listdir(tmp_path) == ["out.jsonl"]  # no temporary file left behind


def test_save_refuses_an_example_with_both_forms(tmp_path: Path):
    both = Example(prompt="p", completion="c", messages=(Message("assistant", "a"),))
    with pytest.raises(DataError, match="both prompt/completion and messages"):
        save_jsonl(tmp_path / "out.jsonl", [both])


text = st.text(max_size=20)
pairs = st.builds(Example, prompt=text, completion=text.filter(bool), task=st.none() | text)
turns = st.builds(Message, role=st.sampled_from(["system", "user"]), content=text)
answers = st.builds(Message, role=st.just("assistant"), content=text.filter(bool))
chats = st.builds(
    lambda before, answer, after, task: Example(messages=(*before, answer, *after), task=task),
    st.lists(turns, max_size=3), answers, st.lists(turns | answers, max_size=3), st.none() | text,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(pairs | chats, min_size=1, max_size=5))
def test_save_then_load_round_trips(examples: list[Example]):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "data.jsonl"
        save_jsonl(path, examples)
        assert load_jsonl(path) == examples


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "completion", "messages", "task", "role", "content", "x"]) | st.text(max_size=5),
        inner, max_size=4,
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values.map(json.dumps).map(str.encode) | st.binary(max_size=30), min_size=1, max_size=4))
def test_random_lines_load_or_raise_data_error(lines: list[bytes]):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            examples = load_jsonl(path)
        except DataError as error:
            assert str(error).startswith(f"{path}:")
        else:
            assert all(isinstance(example, Example) for example in examples)
