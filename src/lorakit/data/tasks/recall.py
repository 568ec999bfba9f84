"""A long-context task: recall a passcode stated at the very start of a ~2,000-token prompt.

The prompt opens with one line, ``The passcode of NAME is CODE.``, then about 1,500 words of distractors: sentences
of common words, and among them 24 other people's passcodes stated the same way. It ends by asking for NAME's
passcode; the answer is CODE (six digits). Only the first line holds it, so a model must carry it across the whole
prompt, past look-alike statements: what long-context training has to teach. Names are made-up words, unique within
a prompt. About 2,000 tokens with the default model's tokenizer (a test checks 1,700 to 2,400).
"""

from __future__ import annotations

import random

from lorakit.data.tasks.base import Task
from lorakit.data.tasks.strings import WORDS, pseudo_word

FILLER_SENTENCES = 150
"""Sentences of common words between the passcode and the question (about 10 words each)."""
OTHER_PASSCODES = 24
"""Other people's passcodes scattered among them."""


def _statement(name: str, code: str) -> str:
    return f"The passcode of {name} is {code}."


def _recall(generator: random.Random) -> tuple[str, str]:
    """The passcode first, then filler and other passcodes, then the question; the answer is the first passcode."""
    names: list[str] = []
    while len(names) < OTHER_PASSCODES + 1:
        name = pseudo_word(generator, 2).capitalize() + " " + pseudo_word(generator, 3).capitalize()
        if name not in names:
            names.append(name)
    codes = [f"{generator.randint(0, 999_999):06d}" for _ in names]
    filler = [" ".join(generator.choice(WORDS) for _ in range(generator.randint(7, 13))).capitalize() + "."
              for _ in range(FILLER_SENTENCES)]
    others = [_statement(name, code) for name, code in zip(names[1:], codes[1:], strict=True)]
    body = filler + others
    generator.shuffle(body)
    lines = [_statement(names[0], codes[0]), " ".join(body), f"What is the passcode of {names[0]}?"]
    return "\n".join(lines), codes[0]


RECALL = Task(name="recall", description="Recall a passcode stated at the start of a ~2,000-token prompt.",
              generate=_recall)
