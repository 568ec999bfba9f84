"""Built-in tasks: determinism, disjoint splits, answers checked independently, scoring, registry."""

from __future__ import annotations

import datetime
import hashlib
import re
import string
from decimal import Decimal

import pytest

from lorakit.data import get_task, task_names
from lorakit.data.tasks import LIMIT, Task, split_of
from lorakit.errors import DataError

#: The first train example of every task: pins the generators across runs, machines and versions.
FIRST_TRAIN = {
    "add": ("Add the two numbers: 2724 + 2236", "4960"),
    "caps": ("Capitalise the first letter of every word: all special we", "All Special We"),
    "count": ("Count how many times the letter u appears in: acnuuupncbfu", "4"),
    "date": ("Write this date in the format YYYY-MM-DD: May 23, 1834", "1834-05-23"),
    "recall": ("sha256:ba760365236caae2", "596974"),  # a ~2,000-token prompt, pinned by its digest
    "reverse": ("Reverse the letters of the word: rodike", "ekidor"),
    "sort": ("Sort these numbers in ascending order: 31, 28, 22, 55", "22, 28, 31, 55"),
    "units": ("Convert to millilitres: 30.18 L", "30180"),
}
#: The recall task's prompt: the passcode, the distractors (one line), the question.
NAME = r"([A-Z][a-z]+ [A-Z][a-z]+)"
RECALL = rf"The passcode of {NAME} is (\d{{6}})\.\n(.+)\nWhat is the passcode of {NAME}\?"
MONTHS = "January February March April May June July August September October November December".split()


def solve_add(text: str) -> str:
    return str(eval(text))  # "2724 + 2236": only digits and '+', checked by the regex below


def solve_date(text: str) -> str:
    month, day, year = re.fullmatch(r"(\w+) (\d+), (\d+)", text).groups()
    return datetime.date(int(year), MONTHS.index(month) + 1, int(day)).isoformat()


def solve_units(text: str) -> str:
    quantity, unit = text.split()
    assert unit in ("km", "kg", "L")
    return str(int(Decimal(quantity) * 1000))


def solve_count(text: str, letter: str) -> str:
    return str(text.count(letter))


def solve_recall(name: str, code: str, body: str, asked: str) -> str:
    """The first passcode, when the question asks for that person and nobody else in the prompt is called so."""
    return code if asked == name and f"passcode of {name} " not in body else "(ambiguous)"


def pinned(prompt: str) -> str:
    """A prompt as FIRST_TRAIN holds it: itself, or the digest of a long one."""
    return prompt if len(prompt) <= 200 else "sha256:" + hashlib.sha256(prompt.encode()).hexdigest()[:16]


#: task -> (prompt pattern, independent solver of the captured groups).
SOLVERS = {
    "add": (r"Add the two numbers: (\d+ \+ \d+)", solve_add),
    "caps": (r"Capitalise the first letter of every word: ([a-z ]+)", string.capwords),
    "count": (r"Count how many times the letter ([a-z]) appears in: ([a-z]+)",
              lambda letter, text: solve_count(text, letter)),
    "date": (r"Write this date in the format YYYY-MM-DD: (.+)", solve_date),
    "recall": (RECALL, solve_recall),
    "reverse": (r"Reverse the letters of the word: ([a-z]+)", lambda word: "".join(reversed(word))),
    "sort": (r"Sort these numbers in ascending order: ([\d, ]+)",
             lambda text: ", ".join(str(n) for n in sorted(int(x) for x in text.split(", ")))),
    "units": (r"Convert to (?:metres|grams|millilitres): (.+)", solve_units),
}


def test_there_are_at_least_six_tasks_with_descriptions():
    assert set(task_names()) == set(FIRST_TRAIN) == set(SOLVERS)
    for name in task_names():
        task = get_task(name)
        assert task.name == name and task.description.endswith(".") and "\n" not in task.description


@pytest.mark.parametrize("name", sorted(FIRST_TRAIN))
def test_examples_are_deterministic_prefixes(name):
    task = get_task(name)
    first = task.examples("train", 300)
    assert (pinned(first[0].prompt), first[0].completion) == FIRST_TRAIN[name]
    assert task.examples("train", 300) == first
    assert task.examples("train", 100) == first[:100]
    assert all(example.task == name for example in first)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_splits_are_disjoint_distinct_and_correct(name):
    task = get_task(name)
    pattern, solve = SOLVERS[name]
    prompts = {}
    for split in ("train", "test"):
        examples = task.examples(split, 2000)
        prompts[split] = {example.prompt for example in examples}
        assert len(prompts[split]) == 2000
        for example in examples:
            assert split_of(name, example.prompt) == split
            match = re.fullmatch(pattern, example.prompt)
            assert match, example.prompt
            assert example.completion == solve(*match.groups())
            assert len(example.completion) <= 45
    assert not prompts["train"] & prompts["test"]


@pytest.mark.parametrize("name", sorted(FIRST_TRAIN))
def test_the_test_split_reaches_its_limit(name):
    task = get_task(name)
    assert len({example.prompt for example in task.examples("test", LIMIT)}) == LIMIT
    too_many = f"task '{name}' makes 0 to {LIMIT} examples per split, asked for {LIMIT + 1}"
    with pytest.raises(DataError, match=too_many):
        task.examples("train", LIMIT + 1)


def test_bad_requests_are_data_errors():
    with pytest.raises(DataError, match="unknown split 'dev'"):
        get_task("add").examples("dev", 1)
    with pytest.raises(DataError, match="asked for -1"):
        get_task("add").examples("train", -1)
    known = r"\(known tasks: add, caps, count, date, recall, reverse, sort, units\)"
    with pytest.raises(DataError, match=f"unknown task 'nope' {known}"):
        get_task("nope")
    tiny = Task(name="tiny", description="Too few instances.", generate=lambda g: (f"p{g.randint(0, 3)}", "a"))
    with pytest.raises(DataError, match=r"task 'tiny' found only \d distinct train examples of 5"):
        tiny.examples("train", 5)


@pytest.mark.parametrize("name, prediction, answer, expected", [
    ("date", " 1834-05-23.\n", "1834-05-23", True),
    ("date", "1834-5-23", "1834-05-23", False),
    ("add", "4960", "4960", True),
    ("add", "4960 ", "4961", False),
    ("add", "The answer is 4960", "4960", False),
    ("sort", "22,28, 31,55", "22, 28, 31, 55", True),
    ("sort", "22, 31, 28, 55", "22, 28, 31, 55", False),
    ("caps", "All Special We.", "All Special We", True),
    ("caps", "All special We", "All Special We", False),
    ("reverse", "\tekidor\n", "ekidor", True),
    ("reverse", "Ekidor", "ekidor", False),
])
def test_scoring_is_exact_after_normalisation(name, prediction, answer, expected):
    assert get_task(name).score(prediction, answer) is expected


def test_a_correct_prediction_scores_on_every_example():
    for name in task_names():
        task = get_task(name)
        for example in task.examples("test", 200):
            assert task.score(example.completion, example.completion)
            wrong = example.completion + "0"
            assert not task.score(wrong, example.completion)


def test_answers_are_a_few_tokens(smol):
    for name in task_names():
        for example in get_task(name).examples("test", 300):
            assert len(smol(example.completion, add_special_tokens=False)["input_ids"]) <= 16, example



def test_the_recall_prompt_is_about_2000_tokens_and_the_passcode_is_stated_once_at_its_start(smol):
    for example in get_task("recall").examples("test", 20):
        assert 1700 <= len(smol(example.prompt)["input_ids"]) <= 2400
        first, _, rest = example.prompt.partition("\n")
        assert example.completion in first and example.completion not in rest
