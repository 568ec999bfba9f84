"""A generated task: deterministic examples, disjoint train/test splits, exact-match scoring.

Each task draws problem instances from a random generator seeded by the task's name and the
split. Which split an instance belongs to is decided by a hash of its prompt (one in
``TEST_SHARE`` goes to test), and each split keeps only its own instances, so the two splits can
never share a problem, whatever ``n``. Drawing is sequential, so ``examples(split, n)`` is a prefix
of ``examples(split, m)`` for ``n <= m``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from lorakit.data.example import Example
from lorakit.errors import DataError

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
#: One instance in TEST_SHARE belongs to the test split.
TEST_SHARE = 4
#: How many distinct examples each split of a task can produce (its problem space is far larger).
LIMIT = 10_000
#: Draws allowed per requested example before giving up (only a too-small problem space hits it).
MAX_DRAWS_PER_EXAMPLE = 100


def normalise_answer(text: str) -> str:
    """The default answer normalisation: strip whitespace and one trailing period."""
    return text.strip().removesuffix(".").strip()


@dataclass(frozen=True, kw_only=True)
class Task:
    """A built-in task: a generator of ``(prompt, answer)`` instances and an exact-match scorer."""

    name: str
    """The registry key, used in ``task:NAME`` data specs."""
    description: str
    """One line saying what the model must do."""
    generate: Callable[[random.Random], tuple[str, str]]
    """Draw one instance from the generator: ``(prompt, answer)``."""
    normalise: Callable[[str], str] = normalise_answer
    """Applied to both prediction and answer before comparing them."""

    def examples(self, split: str, n: int) -> list[Example]:
        """The first ``n`` examples of ``split``: distinct, and the same list on every call."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} for task {self.name!r} (known: train, test)")
        if not 0 <= n <= LIMIT:
            raise DataError(f"task {self.name!r} makes 0 to {LIMIT} examples per split, asked for {n}")
        generator = random.Random(f"lorakit-task:{self.name}:{split}")
        examples: list[Example] = []
        seen: set[str] = set()
        for _ in range(MAX_DRAWS_PER_EXAMPLE * n):
            if len(examples) == n:
                break
            prompt, answer = self.generate(generator)
            if prompt not in seen and split_of(self.name, prompt) == split:
                seen.add(prompt)
                examples.append(Example(prompt=prompt, completion=answer, task=self.name))
        if len(examples) < n:
            raise DataError(f"task {self.name!r} found only {len(examples)} distinct {split} examples of {n}")
        return examples

    def score(self, prediction: str, answer: str) -> bool:
        """Exact match after :attr:`normalise` (by default: whitespace and a trailing period)."""
        return self.normalise(prediction) == self.normalise(answer)


def split_of(task: str, prompt: str) -> Split:
    """The split a problem instance belongs to, from a hash of its task and prompt."""
    digest = hashlib.sha256(f"{task}\0{prompt}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_SHARE == 0 else "train"
