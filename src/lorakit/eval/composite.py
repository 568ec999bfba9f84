"""Composite-task evaluation (MeteoRA's setting): several questions from different tasks in one prompt.

A composite prompt numbers ``k`` questions drawn round-robin from the given built-in tasks' test
splits, and asks for one numbered answer per line::

    Answer each question on its own line, as "1. answer", "2. answer", ...
    1. <question of task a>
    2. <question of task b>

The model's completion is split into lines; the line that starts with ``i.`` is question ``i``'s
answer and is scored with that question's own task scorer (a missing line scores 0). Reported: the
share of correct answers per task and overall, and the share of prompts answered entirely right.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lorakit.data.example import Example
from lorakit.data.tasks import get_task
from lorakit.errors import ConfigError
from lorakit.eval.generate import generate

INSTRUCTION = 'Answer each question on its own line, as "1. answer", "2. answer", ...'
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*)$")


@dataclass(frozen=True)
class CompositeExample:
    """One composite prompt: its questions' tasks and reference answers, in order."""

    prompt: str
    tasks: tuple[str, ...]
    answers: tuple[str, ...]

    def as_example(self) -> Example:
        """The prompt with its reference completion (numbered answer lines), for generation and loss."""
        return Example(prompt=self.prompt, completion="\n".join(f"{i}. {a}" for i, a in enumerate(self.answers, 1)))


def composite_examples(tasks: Sequence[str], *, per_prompt: int = 2, count: int = 50) -> list[CompositeExample]:
    """``count`` composite prompts of ``per_prompt`` questions each, from ``tasks``' test splits in turn."""
    if len(tasks) < 1 or per_prompt < 1 or count < 1:
        raise ConfigError(f"composite prompts need tasks, per_prompt >= 1 and count >= 1; got {list(tasks)}, "
                          f"{per_prompt}, {count}")
    needed = -(-count * per_prompt // len(tasks))  # questions per task, rounded up
    pools = {task: get_task(task).examples("test", needed) for task in tasks}
    questions = [(tasks[j % len(tasks)], pools[tasks[j % len(tasks)]][j // len(tasks)])
                 for j in range(count * per_prompt)]
    composites = []
    for start in range(0, len(questions), per_prompt):
        chosen = questions[start:start + per_prompt]
        lines = "\n".join(f"{i}. {example.prompt}" for i, (_, example) in enumerate(chosen, 1))
        composites.append(CompositeExample(f"{INSTRUCTION}\n{lines}", tuple(task for task, _ in chosen),
                                           tuple(example.answer for _, example in chosen)))
    return composites


def numbered_answers(completion: str, count: int) -> list[str | None]:
    """The answers to questions ``1..count`` in ``completion`` (the first line numbered ``i.``), or None."""
    found: dict[int, str] = {}
    for line in completion.splitlines():
        match = _NUMBERED.match(line)
        if match and int(match.group(1)) not in found:
            found[int(match.group(1))] = match.group(2)
    return [found.get(i) for i in range(1, count + 1)]


@dataclass
class CompositeResult:
    """Per-task and overall accuracy of the composite prompts' answers."""

    per_task: dict[str, float]
    accuracy: float
    all_correct: float
    n_prompts: int
    predictions: list[str] = field(default_factory=list)

    def metrics(self) -> dict:
        return {"n_prompts": self.n_prompts, "accuracy": self.accuracy, "all_correct": self.all_correct,
                "per_task": self.per_task}


def score_composite(composites: Sequence[CompositeExample], completions: Sequence[str]) -> CompositeResult:
    """Score each completion's numbered answers with their own tasks' scorers."""
    hits: dict[str, list[bool]] = {}
    complete = []
    for composite, completion in zip(composites, completions, strict=True):
        answers = numbered_answers(completion, len(composite.tasks))
        right = [answer is not None and get_task(task).score(answer, reference)
                 for task, answer, reference in zip(composite.tasks, answers, composite.answers, strict=True)]
        for task, ok in zip(composite.tasks, right, strict=True):
            hits.setdefault(task, []).append(ok)
        complete.append(all(right))
    every = [ok for oks in hits.values() for ok in oks]
    return CompositeResult({task: sum(oks) / len(oks) for task, oks in hits.items()}, sum(every) / len(every),
                           sum(complete) / len(complete), len(composites), list(completions))


def evaluate_composite(model: nn.Module, tokenizer, composites: Sequence[CompositeExample], *,
                       batch_size: int = 16, max_new_tokens: int = 64) -> CompositeResult:
    """Generate an answer to every composite prompt greedily and score it (:func:`score_composite`)."""
    completions = generate(model, tokenizer, [c.as_example() for c in composites], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    return score_composite(composites, completions)
