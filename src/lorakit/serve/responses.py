"""The OpenAI response bodies: whole completions, streamed chunks, log-probabilities, usage and errors.

Two formats share one interface (:class:`CompletionFormat`, :class:`ChatFormat`), so the code that turns
the engine's events into answers (:mod:`lorakit.serve.answers`) is written once. Log-probabilities
follow each API: completions as parallel lists ``{tokens, token_logprobs, top_logprobs, text_offset}``
(offsets into the choice's ``text``, which starts with the prompt under ``echo``), chat as
``{content: [{token, logprob, bytes, top_logprobs}]}``. JSON has no infinity, so a log-probability of
``-inf`` is sent as ``-9999.0`` (as vLLM does). lorakit's ``routing`` (one ``{expert: weight}`` per token)
rides on each choice when the request asked for it.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from starlette.responses import JSONResponse

from lorakit.serve.requests import TokenLogprob

LOGPROB_FLOOR = -9999.0
"""What a log-probability of ``-inf`` (or below) is sent as."""

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request", 500: "server_error",
               503: "service_unavailable", 504: "timeout_error"}
"""OpenAI's ``error.type`` for each status the server answers with."""

Scored = tuple[int, TokenLogprob | None]
"""A token id and its log-probabilities (None: the prompt's first token, which nothing predicts)."""


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers errors."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


class TokenStrings:
    """Each token id as its own text (``tokenizer.decode([id])``), cached: what logprobs name tokens by."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChoiceParts:
    """What one choice has produced so far (or, in a stream, since its last chunk)."""

    text: str = ""
    scored: list[Scored] = field(default_factory=list)
    routing: list[dict[str, float] | None] | None = None
    finish_reason: str | None = None


class Format:
    """One API's response shapes; ``logprobs`` and ``routing`` say what the request asked for."""

    object = chunk_object = id_prefix = ""

    def __init__(self, model: str, strings: TokenStrings, *, logprobs: bool, routing: bool) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.strings = strings
        self.logprobs = logprobs
        self.routing = routing

    def response(self, choices: Sequence[tuple[int, ChoiceParts]], prompt_tokens: int,
                 completion_tokens: int) -> dict:
        """The whole answer: every choice, complete."""
        return {**self._envelope(self.object), "choices": [self._choice(index, parts) for index, parts in choices],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, index: int, parts: ChoiceParts, *, first: bool) -> dict:
        """One streamed chunk of choice ``index``: new text since the last one (``first``: its first chunk)."""
        choice = {"index": index, **self._delta(index, parts, first), "finish_reason": parts.finish_reason}
        return {**self._envelope(self.chunk_object), "choices": [self._extras(choice, parts)]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk of a stream whose request set ``stream_options.include_usage``."""
        return {**self._envelope(self.chunk_object), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}

    def _envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, index: int, parts: ChoiceParts) -> dict:
        raise NotImplementedError

    def _delta(self, index: int, parts: ChoiceParts, first: bool) -> dict:
        raise NotImplementedError

    def _extras(self, choice: dict, parts: ChoiceParts) -> dict:
        if self.routing:
            choice["routing"] = parts.routing or []
        return choice


class CompletionFormat(Format):
    """``/v1/completions``: ``text_completion`` objects, in whole and in chunks."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, int] = {}

    def _choice(self, index: int, parts: ChoiceParts) -> dict:
        choice = {"index": index, "text": parts.text, "logprobs": self._logprobs(index, parts.scored),
                  "finish_reason": parts.finish_reason}
        return self._extras(choice, parts)

    def _delta(self, index: int, parts: ChoiceParts, first: bool) -> dict:
        return {"text": parts.text, "logprobs": self._logprobs(index, parts.scored)}

    def _logprobs(self, index: int, scored: Sequence[Scored]) -> dict | None:
        """Parallel lists over ``scored``; ``text_offset`` continues from the choice's previous tokens."""
        if not self.logprobs:
            return None
        offset = self._offsets.get(index, 0)
        tokens, values, tops, offsets = [], [], [], []
        for token_id, score in scored:
            text = self.strings(token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            values.append(None if score is None else clamp(score.logprob))
            tops.append(None if score is None else {self.strings(t): clamp(value) for t, value in score.top})
        self._offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class ChatFormat(Format):
    """``/v1/chat/completions``: ``chat.completion`` objects and ``chat.completion.chunk`` deltas."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def _choice(self, index: int, parts: ChoiceParts) -> dict:
        choice = {"index": index, "message": {"role": "assistant", "content": parts.text},
                  "logprobs": self._logprobs(parts.scored), "finish_reason": parts.finish_reason}
        return self._extras(choice, parts)

    def _delta(self, index: int, parts: ChoiceParts, first: bool) -> dict:
        delta = {"role": "assistant", "content": parts.text} if first else \
            {"content": parts.text} if parts.text or parts.finish_reason is None else {}
        return {"delta": delta, "logprobs": self._logprobs(parts.scored)}

    def _logprobs(self, scored: Sequence[Scored]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**self._token(token_id, score.logprob),
                             "top_logprobs": [self._token(t, value) for t, value in score.top]}
                            for token_id, score in scored if score is not None]}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.strings(token_id)
        return {"token": text, "logprob": clamp(logprob), "bytes": list(text.encode("utf-8"))}


def clamp(logprob: float) -> float:
    """A log-probability JSON can carry: ``-inf`` and NaN become :data:`LOGPROB_FLOOR`."""
    return logprob if math.isfinite(logprob) and logprob > LOGPROB_FLOOR else LOGPROB_FLOOR
