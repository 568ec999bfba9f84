"""Composite-task evaluation: prompts of several tasks' questions, each answer scored by its own task."""

from __future__ import annotations

import pytest

import lorakit
from lorakit.data.tasks import get_task
from lorakit.eval.composite import (
    INSTRUCTION,
    composite_examples,
    evaluate_composite,
    numbered_answers,
    score_composite,
)
from tests.helpers import char_tokenizer, tiny_llama


def test_prompts_interleave_the_tasks_and_number_the_questions():
    composites = composite_examples(["date", "caps"], per_prompt=2, count=3)
    assert [c.tasks for c in composites] == [("date", "caps")] * 3
    dates, caps = get_task("date").examples("test", 3), get_task("caps").examples("test", 3)
    first = composites[0]
    assert first.prompt == f"{INSTRUCTION}\n1. {dates[0].prompt}\n2. {caps[0].prompt}"
    assert first.answers == (dates[0].answer, caps[0].answer)
    assert composites[2].answers == (dates[2].answer, caps[2].answer)
    assert first.as_example().completion == f"1. {dates[0].answer}\n2. {caps[0].answer}"


def test_numbered_answers_take_the_first_line_of_each_number():
    text = "Sure.\n2) second\n1. first\n1. again\nnoise"
    assert numbered_answers(text, 3) == ["first", "second", None]


def test_each_answer_is_scored_by_its_own_task():
    composites = composite_examples(["date", "caps"], per_prompt=2, count=2)
    a, b = composites
    completions = [f"1. {a.answers[0]}\n2. {a.answers[1]}",        # both right
                   f"1. {b.answers[0]}\n2. wrong"]                  # date right, caps wrong
    result = score_composite(composites, completions)
    assert result.per_task == {"date": 1.0, "caps": 0.5}
    assert result.accuracy == pytest.approx(0.75) and result.all_correct == pytest.approx(0.5)
    assert score_composite(composites, ["", ""]).accuracy == 0.0  # missing lines score 0


def test_evaluating_a_model_generates_one_completion_per_prompt():
    composites = composite_examples(["count"], per_prompt=2, count=3)
    result = evaluate_composite(tiny_llama(), char_tokenizer(), composites, max_new_tokens=4)
    assert result.n_prompts == 3 and len(result.predictions) == 3 and set(result.per_task) == {"count"}


def test_bad_arguments_are_refused():
    with pytest.raises(lorakit.ConfigError, match="per_prompt"):
        composite_examples(["date"], per_prompt=0)
