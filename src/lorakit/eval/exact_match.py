"""Evaluation: exact match of generated answers, and the loss and perplexity on the references.

``exact_match = mean_i [score(generate(prompt_i), answer_i)]``, where ``score`` is the task's own
scorer for built-in tasks and whitespace-stripped string equality otherwise;
``perplexity = exp(mean token loss on the reference completions)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from lorakit.data.encoding import encode, pad_id
from lorakit.data.example import Example
from lorakit.data.formatting import use_chat
from lorakit.data.tasks import get_task, task_names
from lorakit.eval.generate import generate
from lorakit.eval.loss import mean_loss

Scorer = Callable[[str, str], bool]


def exact(prediction: str, answer: str) -> bool:
    """The default scorer: equal after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


def scorer_for(example: Example) -> Scorer:
    """The built-in task's scorer when the example names one, else :func:`exact`."""
    if example.task is not None and example.task in task_names():
        return get_task(example.task).score
    return exact


@dataclass
class EvalResult:
    """Metrics of one evaluation, plus each prediction for inspection."""

    n: int
    exact_match: float
    loss: float
    perplexity: float
    predictions: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float | int]:
        return {"n": self.n, "exact_match": self.exact_match, "loss": self.loss, "perplexity": self.perplexity}


def evaluate(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
             max_new_tokens: int | None = None, chat: bool | None = None, max_length: int = 512,
             scorer: Scorer | None = None, progress: bool = False) -> EvalResult:
    """Score ``examples``: generate each answer greedily and compare; compute the reference loss.

    ``max_new_tokens`` defaults to the longest reference answer in tokens plus 8.
    """
    chat = use_chat(tokenizer, chat)
    if max_new_tokens is None:
        longest = max((len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples), default=8)
        max_new_tokens = longest + 8
    predictions = generate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           chat=chat, progress=progress)
    hits = sum((scorer or scorer_for(e))(p, e.answer) for p, e in zip(predictions, examples, strict=True))
    encoded = [encode(e, tokenizer, chat=chat, max_length=max_length) for e in examples]
    loss = mean_loss(model, encoded, batch_size=batch_size, pad_id=pad_id(tokenizer))
    n = len(examples)
    return EvalResult(n, hits / n if n else float("nan"), loss,
                      math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf"), predictions)
