"""load_examples: a JSONL path or task:NAME, and the errors for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.data import Example, get_task, load_examples, save_jsonl
from lorakit.data.source import DEFAULT_TASK_EXAMPLES
from lorakit.errors import DataError


def test_a_task_spec_gives_that_split():
    assert load_examples("task:reverse", split="test", n=5) == get_task("reverse").examples("test", 5)
    assert load_examples("task:reverse", n=3) == get_task("reverse").examples("train", 3)
    assert len(load_examples("task:add")) == DEFAULT_TASK_EXAMPLES


def test_a_file_spec_gives_all_or_the_first_n(tmp_path: Path):
    examples = [Example(prompt=f"p{i}", completion=f"c{i}") for i in range(4)]
    path = tmp_path / "data.jsonl"
    save_jsonl(path, examples)
    assert load_examples(str(path)) == examples
    assert load_examples(str(path), n=2, split="test") == examples[:2]
    assert load_examples(str(path), n=0) == []
    with pytest.raises(DataError, match="asked for the first 5 examples, the file holds 4"):
        load_examples(str(path), n=5)


@pytest.mark.parametrize("spec, message", [
    ("task:nope", r"unknown task 'nope' \(known tasks: add, caps"),
    ("missing.jsonl", r"'missing.jsonl' is neither an existing file nor task:NAME \(known tasks: add"),
    ("reverse", "is neither an existing file nor task:NAME"),
])
def test_other_specs_are_data_errors(spec, message):
    with pytest.raises(DataError, match=message):
        load_examples(spec)


def test_bad_split_or_n_are_data_errors(tmp_path: Path):
    with pytest.raises(DataError, match="is neither an existing file"):
        load_examples(str(tmp_path))  # a directory is not a data file
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_examples("task:add", split="valid")
    with pytest.raises(DataError, match="n must be a number of examples >= 0"):
        load_examples("task:add", n=-2)
