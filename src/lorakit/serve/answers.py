"""From the engine's events to an answer: one JSON body, or a stream of server-sent events.

A request may be several engine requests (a completions request with a list of prompts is one per
prompt); their choices are numbered as OpenAI numbers them, ``prompt_index * n + j``. A client that
goes away cancels every one of them: a streaming client when Starlette closes the stream (the
generator's ``finally``), a waiting client when a watcher receives the disconnect message. A choice that ends in
``timeout``, ``cancelled`` or ``error`` makes the whole answer an error: 504, 503 or 500 as a JSON body,
or an ``{"error": ...}`` event followed by ``data: [DONE]`` in a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lorakit.serve.requests import ChoiceEnd, Event, PromptScores, RequestHandle, TextDelta
from lorakit.serve.responses import ChoiceParts, Format, error_body, error_response

log = logging.getLogger("lorakit.serve")

CLIENT_CLOSED = 499
"""The status recorded for a request whose client left before its answer (nginx's convention; nobody reads it)."""
FAILED_ENDS = {"timeout": (504, "the request timed out"),
               "cancelled": (503, "the request was cancelled (the server is shutting down)"),
               "error": (500, "the engine failed on this request")}
"""The status and default message of each way a choice can end without an answer."""


@dataclass
class Answer:
    """The engine requests behind one HTTP request, and the format of its response."""

    handles: Sequence[RequestHandle]
    format: Format
    echoed: Sequence[str] = ()
    """Each handle's prompt as text, when its choices start with it (``echo``)."""
    include_usage: bool = False
    client_left: bool = False
    """The client closed the connection (its choices were cancelled for that)."""

    @property
    def choices_per_handle(self) -> int:
        return self.handles[0].request.n

    @property
    def prompt_tokens(self) -> int:
        return sum(handle.prompt_tokens for handle in self.handles)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event of every handle with its choice's number in the answer, as they arrive."""
        if len(self.handles) == 1:
            async for item in self._numbered(0):
                yield item
            return
        arrivals: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def forward(number: int) -> None:
            async for item in self._numbered(number):
                arrivals.put_nowait(item)

        readers = [asyncio.ensure_future(forward(number)) for number in range(len(self.handles))]
        open_choices = len(self.handles) * self.choices_per_handle
        try:
            while open_choices:
                index, event = await arrivals.get()
                open_choices -= isinstance(event, ChoiceEnd)
                yield index, event
        finally:
            for reader in readers:
                reader.cancel()

    async def _numbered(self, number: int) -> AsyncIterator[tuple[int, Event]]:
        """Handle ``number``'s events with their choices' numbers; the prompt's scores (which the engine
        computes once per request) go to each of its choices."""
        n = self.choices_per_handle
        scored: set[int] = set()
        async for event in self.handles[number].events():
            if isinstance(event, PromptScores):
                for j in sorted(set(range(n)) - scored):
                    yield number * n + j, event
                scored.update(range(n))
            else:
                yield number * n + event.index, event

    def start(self, index: int) -> ChoiceParts:
        """A choice before its first event: the prompt's text under ``echo``."""
        return ChoiceParts(text=self.echoed[index // self.choices_per_handle] if self.echoed else "")


async def respond(request: Request, answer: Answer) -> Response:
    """Wait for every choice and answer with the whole response (or the error that ended a choice)."""
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, answer))
    done = False
    try:
        parts: dict[int, ChoiceParts] = {}
        completion_tokens = 0
        async for index, event in answer.events():
            choice = parts.get(index) or parts.setdefault(index, answer.start(index))
            if isinstance(event, ChoiceEnd):
                if answer.client_left:
                    return error_response(CLIENT_CLOSED, "the client closed the connection", code="client_closed")
                if event.reason in FAILED_ENDS:
                    return _failed(event)
                choice.finish_reason = event.reason
                completion_tokens += event.completion_tokens
            else:
                _add(choice, event, answer.format.routing)
        done = True
        body = answer.format.response(sorted(parts.items()), answer.prompt_tokens, completion_tokens)
        return JSONResponse(body)
    finally:
        watcher.cancel()
        if not done:
            answer.cancel()


async def stream(answer: Answer) -> AsyncIterator[str]:
    """The answer as server-sent events: chunks as the text comes, a last chunk per choice with its
    ``finish_reason``, the usage chunk if asked, then ``data: [DONE]``."""
    done = False
    started: set[int] = set()
    completion_tokens = 0
    fmt = answer.format
    try:
        if answer.echoed and not fmt.logprobs:  # with logprobs, the echo comes with the prompt's scores
            for index in range(len(answer.handles) * answer.choices_per_handle):
                started.add(index)
                yield _event(fmt.chunk(index, answer.start(index), first=True))
        async for index, event in answer.events():
            if isinstance(event, ChoiceEnd):
                if event.reason in FAILED_ENDS:
                    answer.cancel()
                    yield _event(error_body(*_failure(event), code=event.reason))
                    break
                completion_tokens += event.completion_tokens
                piece = ChoiceParts(finish_reason=event.reason)
            else:
                piece = answer.start(index) if isinstance(event, PromptScores) else ChoiceParts()
                _add(piece, event, fmt.routing)
                if not (piece.text or piece.scored and fmt.logprobs or piece.routing or index not in started):
                    continue
            yield _event(fmt.chunk(index, piece, first=index not in started))
            started.add(index)
        else:
            if answer.include_usage:
                yield _event(fmt.usage_chunk(answer.prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
        done = True
    except Exception as error:  # the response has started: the error can only be an event
        log.exception("unexpected error while streaming an answer")
        yield _event(error_body(500, f"internal server error ({type(error).__name__}: {error})",
                                code="internal_error"))
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            answer.cancel()


def _add(choice: ChoiceParts, event: TextDelta | PromptScores, routing: bool) -> None:
    """Add a text delta's text, tokens and (with ``routing``) each token's routing, None where the engine sent
    none, or the prompt's scores, to a choice."""
    if isinstance(event, PromptScores):
        choice.scored.extend(zip(event.tokens, event.logprobs, strict=True))
        return
    choice.text += event.text
    choice.scored.extend((token.token_id, token) for token in event.tokens)
    if routing:
        weights = [dict(w) for w in event.routing] if event.routing is not None else [None] * len(event.tokens)
        choice.routing = (choice.routing or []) + weights


def _failure(end: ChoiceEnd) -> tuple[int, str]:
    status, default = FAILED_ENDS[end.reason]
    return status, end.message or default


def _failed(end: ChoiceEnd) -> Response:
    status, message = _failure(end)
    return error_response(status, message, code=end.reason)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _cancel_on_disconnect(request: Request, answer: Answer) -> None:
    """Wait for the client to go away (the body is read, so the next message is the disconnect) and cancel."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    answer.client_left = True
    answer.cancel()
