"""One choice of one request as the engine runs it: its tokens, its slot, its row choice, its text."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lorakit.core.routing import RowChoice
from lorakit.serve.detokenize import TextStream
from lorakit.serve.requests import ChoiceEnd, RequestHandle, TextDelta, TokenLogprob


@dataclass(eq=False, kw_only=True)
class Sequence:
    """A choice being generated: ``prompt`` then ``generated``; ``cached`` tokens are in its KV slot."""

    handle: RequestHandle
    index: int
    """The choice's index in its request."""
    row: RowChoice
    """What the row runs in the shared lane: an adapter (its served version), a combination, or the base."""
    holds: tuple[str, ...]
    """The adapter versions the sequence keeps in use until it ends."""
    text: TextStream
    generator: torch.Generator | None
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    cached: int = 0
    slot: int = -1
    arrived: float = field(default_factory=time.monotonic)
    last_token: float | None = None
    ended: bool = False

    @property
    def request(self):
        return self.handle.request

    @property
    def length(self) -> int:
        """Tokens so far: the prompt and what was generated."""
        return len(self.prompt) + len(self.generated)

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    def emit(self, token: TokenLogprob, routing=None, *, text: bool = True) -> None:
        """Publish ``token`` with its text (what the stop strings let through; none for an end token)."""
        self.generated.append(token.token_id)
        text = self.text.push(token.token_id) if text else ""
        self.handle.publish(TextDelta(self.index, text, (token,), None if routing is None else (routing,)))

    def end(self, reason: str, message: str = "") -> None:
        """Publish the held-back text (unless a stop string cut it) and the end of the choice."""
        if self.ended:
            return
        self.ended = True
        rest = self.text.finish() if reason in ("length", "stop") else ""
        if rest:
            self.handle.publish(TextDelta(self.index, rest, ()))
        self.handle.publish(ChoiceEnd(self.index, reason, len(self.generated), message))
