"""One training or evaluation example, in either of the two JSONL forms lorakit reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` is ``"system"``, ``"user"`` or ``"assistant"``."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """A prompt/completion pair, or a chat conversation; ``task`` names its task for mixtures.

    Exactly one form is set: ``prompt`` and ``completion`` (the loss is on the completion), or
    ``messages`` (the loss is on the assistant turns).
    """

    prompt: str | None = None
    completion: str | None = None
    messages: tuple[Message, ...] | None = None
    task: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def answer(self) -> str:
        """The reference answer for exact-match scoring: the completion or the last assistant turn."""
        if self.messages is None:
            return self.completion or ""
        assistant = [m.content for m in self.messages if m.role == "assistant"]
        return assistant[-1] if assistant else ""
