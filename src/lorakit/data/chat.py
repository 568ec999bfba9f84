"""Chat templates: cut a rendered conversation into pieces that say what the loss supervises.

The pieces come from rendering the conversation up to each assistant turn and comparing prefixes,
so they are exact for any chat template that renders a conversation incrementally (every rendering
of a shorter conversation is a prefix of the longer one).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jinja2 import TemplateError

from lorakit.data.example import Message
from lorakit.errors import DataError

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class Role(enum.Enum):
    """What the loss does with a piece of text."""

    CONTEXT = "context"
    """Not supervised: prompts, system and user turns, template markup."""
    TARGET = "target"
    """Supervised: a completion or an assistant turn's content."""
    CLOSE = "close"
    """The markup after an assistant turn: supervised up to and including its first special token
    (the end-of-turn token, e.g. ``<|im_end|>``), so that the model learns to stop. A template that
    ends turns without a special token gets none of it supervised (and teaches no stop token)."""


@dataclass(frozen=True, kw_only=True)
class Piece:
    """A run of characters of an example's text, and what the loss does with it."""

    text: str
    """The characters."""
    role: Role
    """Whether they are supervised."""


def chat_pieces(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[Piece]:
    """Pieces of a rendered conversation: each assistant turn's content is a TARGET.

    For assistant turn ``i`` the text between ``render(messages[:i], generation_prompt=True)`` and
    ``render(messages[:i + 1])`` is that turn: its content is TARGET and what follows the content
    is CLOSE. A template that changes the content (so that it cannot be found in the turn) has the
    whole turn supervised instead. A template whose renderings are not prefixes of each other
    raises :class:`DataError`.
    """
    result: list[Piece] = []
    done = ""
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = render(tokenizer, messages[:index], generation_prompt=True)
        after = render(tokenizer, messages[: index + 1], generation_prompt=False)
        result.append(Piece(text=_extension(done, before, index), role=Role.CONTEXT))
        result.extend(_assistant_pieces(_extension(before, after, index), message.content))
        done = after
    full = render(tokenizer, messages, generation_prompt=False)
    result.append(Piece(text=_extension(done, full, len(messages)), role=Role.CONTEXT))
    return [piece for piece in result if piece.text]


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, generation_prompt: bool
) -> str:
    """Render ``messages`` with the tokenizer's chat template, as text."""
    turns = [{"role": message.role, "content": message.content} for message in messages]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError) as error:
        raise DataError(f"the chat template cannot render this conversation: {error}") from error
    if not isinstance(text, str):
        raise DataError(f"the chat template rendered a {type(text).__name__}, expected text")
    return text


def _assistant_pieces(turn: str, content: str) -> list[Piece]:
    """Split one rendered assistant turn into markup, content (TARGET) and closing markup."""
    for needle in (content, content.strip()):
        start = turn.find(needle) if needle else -1
        if start >= 0:
            end = start + len(needle)
            return [Piece(text=turn[:start], role=Role.CONTEXT),
                    Piece(text=needle, role=Role.TARGET),
                    Piece(text=turn[end:], role=Role.CLOSE)]
    return [Piece(text=turn, role=Role.TARGET)]


def _extension(prefix: str, text: str, turn: int) -> str:
    """What ``text`` adds to ``prefix``; a template that rewrites earlier turns cannot be masked."""
    if not text.startswith(prefix):
        raise DataError(
            f"the chat template renders the conversation up to turn {turn} differently from the "
            f"start of the longer conversation, so the loss mask cannot be computed; use a "
            f"template that renders conversations incrementally, or the prompt/completion form"
        )
    return text[len(prefix):]
