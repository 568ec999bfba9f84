"""What the HTTP layer hands the engine, and what comes back: one generation request and its events.

A :class:`GenerationRequest` is already tokenised and validated against the OpenAI fields it came
from. The engine answers through a :class:`RequestHandle`: an asynchronous stream of events per choice
(text deltas with their tokens and log-probabilities, the prompt's log-probabilities for ``echo``, one
end event per choice) read on the event loop while the engine thread generates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from lorakit.errors import LorakitError


class RequestError(LorakitError, ValueError):
    """A request the server refuses (HTTP 400, or ``status``): the message names the field that was wrong."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


class QueueFull(LorakitError, RuntimeError):
    """The engine's queue is full (HTTP 429): retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: int = 1) -> None:
        super().__init__(f"the server is busy: {depth} requests are queued; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Sampling:
    """How a choice picks its tokens: greedy at ``temperature == 0``, else a sample from
    ``softmax(logits / temperature)`` cut to the smallest set of tokens whose probability reaches
    ``top_p``, drawn from a generator of the choice's own (``seed`` + the choice's index)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One request: ``n`` choices continuing ``prompt_ids`` with the model named ``model``."""

    model: str
    """A name the server serves: the base, an adapter or a mixture."""
    prompt_ids: tuple[int, ...]
    max_tokens: int
    """New tokens per choice; 0 only with ``echo`` (scoring the prompt, as evaluation harnesses do)."""
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    """Strings that end a choice; the text returned stops before the first one."""
    n: int = 1
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each token's log-probability and its k most likely alternatives."""
    echo: bool = False
    """Also score the prompt (its tokens' log-probabilities, with ``logprobs``)."""
    adapters: Mapping[str, float] | None = None
    """A weighted, unmerged combination of served adapters for this request only (``model`` is the base)."""
    return_routing: bool = False
    """For mixtures: each generated token's expert weights."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the ``k`` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text of choice ``index``: ``text`` (possibly empty while a stop string might be starting) for the
    tokens ``tokens``; ``routing`` holds each token's expert weights when asked for."""

    index: int
    text: str
    tokens: tuple[TokenLogprob, ...]
    routing: tuple[Mapping[str, float], ...] | None = None


@dataclass(frozen=True)
class PromptScores:
    """The prompt's tokens with their log-probabilities (``None`` for the first token), for ``echo``."""

    index: int
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob | None, ...]


FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


@dataclass(frozen=True)
class ChoiceEnd:
    """Choice ``index`` is complete: ``reason`` is one of :data:`FINISH_REASONS`; ``message`` says why for
    ``timeout``, ``cancelled`` and ``error``."""

    index: int
    reason: str
    completion_tokens: int
    message: str = ""


Event = TextDelta | PromptScores | ChoiceEnd


@dataclass
class RequestHandle:
    """The engine's answer to one request, read on the event loop that submitted it."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    arrived: float = field(default_factory=time.monotonic)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to the reader (from any thread)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def cancel(self, reason: str = "the client closed the connection") -> None:
        """Stop generating: every choice still running ends ``cancelled`` with ``reason``."""
        self.cancel_reason = reason
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in order, until each of the ``n`` choices has ended."""
        open_choices = self.request.n
        while open_choices:
            event = await self.queue.get()
            if isinstance(event, ChoiceEnd):
                open_choices -= 1
            yield event
