"""The OpenAI request bodies of ``/v1/completions`` and ``/v1/chat/completions``, validated, and what they ask
the engine for (:class:`~lorakit.serve.requests.GenerationRequest`).

Bodies follow the OpenAI API (fields it defines that lorakit does not use, such as ``frequency_penalty``,
are ignored, as clients send them), plus lorakit's extensions ``adapters`` (a weighted combination of
served adapters for this request) and ``return_routing`` (a mixture's expert weights per token). A body
that does not validate raises :class:`RequestError` naming the field: ``max_tokens: must be >= 0``,
``adapters.b: weight 'x' is not a number``, ``messages[1].role: must be one of ...``.

Prompts are tokenised as ``lorakit generate`` does, so the server answers what the library answers: a
completion prompt string as ``prompt_ids(tokenizer, prompt, chat=False)`` (``generate(..., chat=False)``),
a conversation rendered with the chat template and its generation prompt, then tokenised without the
tokenizer's own special tokens (a one-user-message chat is ``generate(..., chat=True)``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorakit.data.chat import render
from lorakit.data.encoding import prompt_ids
from lorakit.data.example import Message
from lorakit.errors import DataError
from lorakit.serve.requests import GenerationRequest, RequestError, Sampling

DEFAULT_COMPLETION_TOKENS = 16
"""``max_tokens`` of a completion that does not say (OpenAI's default)."""
MAX_CHOICES = 256
"""Choices one request may ask for: prompts x ``n``."""
MAX_STOP = 4
"""Stop strings per request (OpenAI's limit)."""
MAX_COMPLETION_LOGPROBS = 5
"""Alternatives per token a completion may ask for (``logprobs``; OpenAI's limit)."""
MAX_CHAT_TOP_LOGPROBS = 20
"""Alternatives per token a chat completion may ask for (``top_logprobs``; OpenAI's limit)."""
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
"""The seeds a torch generator accepts."""
CHAT_ROLES = ("system", "developer", "user", "assistant")
"""Roles a message may have; ``developer`` is OpenAI's newer name for ``system`` and is rendered as one."""


class Invalid(ValueError):
    """A value a validator refuses; ``where`` extends the field's location (``".b"``, ``"[1]"``)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False
    """Send a last chunk with the request's ``usage`` (and no choices) before ``[DONE]``."""


class Body(BaseModel):
    """What both endpoints accept."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    """0: greedy decoding; else sampling at this temperature (default 1)."""
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: tuple[str, ...] = ()
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    adapters: dict[str, float] | None = None
    """lorakit: a weighted, unmerged combination of served adapters for this request (``model`` the base)."""
    return_routing: bool | None = False
    """lorakit: return each generated token's expert weights (mixtures)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        stops = (value,) if isinstance(value, str) else () if value is None else value
        if not isinstance(stops, list | tuple) or len(stops) > MAX_STOP:
            raise Invalid(f"must be a string or a list of at most {MAX_STOP} strings")
        for index, stop in enumerate(stops):
            if not isinstance(stop, str) or not stop:
                raise Invalid(f"must be a non-empty string, got {stop!r}", f"[{index}]")
        return tuple(stops)

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters(cls, value: Any) -> dict[str, float] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            raise Invalid('must be an object of adapter names and weights, e.g. {"a": 1.0, "b": -0.5}')
        for name, weight in value.items():
            if not name:
                raise Invalid("adapter names must not be empty")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise Invalid(f"weight {weight!r} is not a number", f".{name}")
            if not math.isfinite(weight):
                raise Invalid(f"weight {weight!r} is not a finite number", f".{name}")
        return {name: float(weight) for name, weight in value.items()}

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed)

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def request(self, ids: list[int], max_tokens: int, logprobs: int | None, echo: bool) -> GenerationRequest:
        return GenerationRequest(model=self.model, prompt_ids=tuple(ids), max_tokens=max_tokens,
                                 sampling=self.sampling, stop=self.stop, n=self.choices, logprobs=logprobs,
                                 echo=echo, adapters=self.adapters, return_routing=bool(self.return_routing))


Prompt = str | tuple[int, ...]
"""One completion prompt: text, or token ids."""


class CompletionBody(Body):
    """``POST /v1/completions``."""

    prompt: tuple[Prompt, ...]
    """Normalised to a tuple of prompts; each gives ``n`` choices, numbered ``prompt_index * n + j``."""
    max_tokens: int | None = Field(None, ge=0)
    """New tokens per choice (default 16); 0 only with ``echo``, to score the prompt."""
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> tuple[Prompt, ...]:
        shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not value:
            raise Invalid(f"must be {shapes}")
        if all(isinstance(item, str) for item in value):
            return tuple(value)
        if all(_is_token_id(item) for item in value):
            return (tuple(value),)
        if all(isinstance(item, list) for item in value):
            for index, item in enumerate(value):
                if not item or not all(_is_token_id(token) for token in item):
                    raise Invalid("must be a non-empty list of token ids (integers >= 0)", f"[{index}]")
            return tuple(tuple(item) for item in value)
        raise Invalid(f"must be {shapes}")

    def requests(self, tokenizer) -> list[GenerationRequest]:
        """One engine request per prompt."""
        max_tokens = DEFAULT_COMPLETION_TOKENS if self.max_tokens is None else self.max_tokens
        if max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens", "must be >= 1 (0 only with echo, to score the prompt)")
        if len(self.prompt) * self.choices > MAX_CHOICES:
            raise RequestError("n", f"{len(self.prompt)} prompts x n={self.choices} choices exceed the "
                                    f"{MAX_CHOICES} choices one request may ask for")
        fields = [f"prompt[{index}]" for index in range(len(self.prompt))] if len(self.prompt) > 1 else ["prompt"]
        return [self.request(_completion_ids(tokenizer, prompt, field), max_tokens, self.logprobs, bool(self.echo))
                for prompt, field in zip(self.prompt, fields, strict=True)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal[CHAT_ROLES]
    content: str
    """A string, or a list of ``{"type": "text", "text": ...}`` parts, joined."""

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        if isinstance(value, str):
            return _unicode(value)
        if not isinstance(value, list):
            raise Invalid("must be a string or a list of text parts")
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise Invalid(f"only text parts are served, got {kind!r}", f"[{index}].type")
            if not isinstance(part.get("text"), str):
                raise Invalid("must be a string", f"[{index}].text")
        return _unicode("".join(part["text"] for part in value))


class ChatBody(Body):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for ``max_tokens``; either one (default: up to the model's context)."""
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def request_for(self, tokenizer, context_length: int) -> GenerationRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")
        turns = [Message(role="system" if m.role == "developer" else m.role, content=m.content) for m in self.messages]
        try:
            text = render(tokenizer, turns, generation_prompt=True)
        except DataError as error:
            raise RequestError("messages", str(error)) from error
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        max_tokens = self.max_completion_tokens or self.max_tokens or max(1, context_length - len(ids))
        return self.request(ids, max_tokens, (self.top_logprobs or 0) if self.logprobs else None, echo=False)


class UnloadAdapterBody(BaseModel):
    """``POST /v1/unload_lora_adapter`` (vLLM's body)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: str = Field(min_length=1)


class LoadAdapterBody(UnloadAdapterBody):
    """``POST /v1/load_lora_adapter`` (vLLM's body); a relative ``lora_path`` is relative to the adapter root."""

    lora_path: str = Field(min_length=1)


def parse(body_type: type[BaseModel], data: Any) -> Any:
    """``data`` (a decoded JSON value) as ``body_type``, or a :class:`RequestError` naming each wrong field."""
    if not isinstance(data, dict):
        raise RequestError("body", f"must be a JSON object, got {type(data).__name__}")
    try:
        return body_type.model_validate(data)
    except ValidationError as error:
        problems = [_problem(detail) for detail in error.errors()]
        first = problems[0][0]
        message = "; ".join(f"{where}: {what}" for where, what in problems[:5])
        raise RequestError(first, message.removeprefix(f"{first}: ")) from None


def _completion_ids(tokenizer, prompt: Prompt, field: str) -> list[int]:
    if isinstance(prompt, str) and not _is_unicode(prompt):
        raise RequestError(field, _NOT_UNICODE)
    ids = prompt_ids(tokenizer, prompt, chat=False) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise RequestError(field, "must not be empty")
    vocabulary = len(tokenizer)
    for position, token in enumerate(ids):
        if token >= vocabulary:
            raise RequestError(field, f"token id {token} at position {position} is not in the vocabulary "
                                      f"(ids 0..{vocabulary - 1})")
    return ids


_NOT_UNICODE = "must be valid Unicode text (it holds an unpaired surrogate escape such as \\ud800)"


def _is_unicode(text: str) -> bool:
    """Whether ``text`` can be encoded (JSON's ``\\ud800`` escapes decode to lone surrogates that cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unicode(text: str) -> str:
    if not _is_unicode(text):
        raise Invalid(_NOT_UNICODE)
    return text


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_MESSAGES = {
    "missing": "is required",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "too_short": "must have at least {min_length} item(s)",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "literal_error": "must be one of {expected}",
}


def _problem(detail: dict) -> tuple[str, str]:
    """(where, what) of one pydantic error: ``("messages[0].role", "must be one of ...")``."""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in detail["loc"]).lstrip(".")
    context = detail.get("ctx") or {}
    cause = context.get("error")
    if isinstance(cause, Invalid):
        return where + cause.where, str(cause)
    if isinstance(cause, Exception):
        return where, str(cause)
    template = _MESSAGES.get(detail["type"])
    return where, template.format(**context) if template else detail["msg"][:1].lower() + detail["msg"][1:]
