"""Running the engine in-process for the tests: submit requests on an event loop and collect the answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from lorakit.data.encoding import prompt_ids
from lorakit.serve.engine import Engine
from lorakit.serve.requests import ChoiceEnd, GenerationRequest, PromptScores, Sampling, TextDelta

GREEDY = Sampling(temperature=0.0)


@dataclass
class Answer:
    """What one request's events said, per choice."""

    texts: dict[int, str] = field(default_factory=dict)
    ends: dict[int, ChoiceEnd] = field(default_factory=dict)
    tokens: dict[int, list] = field(default_factory=dict)
    routing: dict[int, list] = field(default_factory=dict)
    scores: PromptScores | None = None

    @property
    def text(self) -> str:
        return self.texts.get(0, "")


def request(engine: Engine, model: str, prompt: str, **fields) -> GenerationRequest:
    """A request for ``prompt`` (raw, no chat template), greedy unless ``sampling`` is given."""
    fields.setdefault("sampling", GREEDY)
    fields.setdefault("max_tokens", 10)
    return GenerationRequest(model=model, prompt_ids=tuple(prompt_ids(engine.tokenizer, prompt, chat=False)),
                             **fields)


async def collect(engine: Engine, generation: GenerationRequest, *, cancel_after: int | None = None) -> Answer:
    """Submit ``generation`` and read its events to the end (cancelling after ``cancel_after`` deltas)."""
    handle = engine.submit(generation, asyncio.get_running_loop())
    answer, deltas = Answer(), 0
    async for event in handle.events():
        if isinstance(event, TextDelta):
            answer.texts[event.index] = answer.texts.get(event.index, "") + event.text
            answer.tokens.setdefault(event.index, []).extend(event.tokens)
            answer.routing.setdefault(event.index, []).extend(event.routing or [])
            deltas += 1
            if cancel_after is not None and deltas == cancel_after:
                handle.cancel()
        elif isinstance(event, PromptScores):
            answer.scores = event
        elif isinstance(event, ChoiceEnd):
            answer.ends[event.index] = event
    return answer


def run_all(engine: Engine, requests: list[GenerationRequest]) -> list[Answer]:
    """Every request at once (each joins the running batch as it arrives); their answers in order."""
    async def main() -> list[Answer]:
        return list(await asyncio.gather(*[collect(engine, r) for r in requests]))
    return asyncio.run(main())
