"""Turn an :class:`Example` into text: the raw prompt + completion, or a chat conversation.

:func:`pieces` cuts an example's training text into pieces that say which characters the loss
supervises (:mod:`lorakit.data.chat` does it for conversations); :mod:`lorakit.data.encoding`
turns them into token ids and labels. :func:`prompt_text` is the text a model continues at
generation time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit.data.chat import Piece, Role, chat_pieces, render
from lorakit.data.example import Example, Message
from lorakit.errors import DataError

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_NEEDS_TEMPLATE = "a chat example (messages) needs chat mode and a tokenizer with a chat template"


def use_chat(tokenizer: PreTrainedTokenizerBase, chat: bool | None) -> bool:
    """Resolve the ``chat`` setting: ``None`` means "if the tokenizer has a chat template".

    ``chat=True`` with a tokenizer that has no template raises :class:`DataError`.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        return has_template
    if chat and not has_template:
        raise DataError(
            "chat=True but the tokenizer has no chat template; pass chat=False to train on the raw "
            "prompt followed by the completion, or chat=None to decide from the tokenizer"
        )
    return chat


def prompt_text(
    tokenizer: PreTrainedTokenizerBase, example_or_prompt: Example | str, chat: bool | None
) -> str:
    """The text a model continues to answer: what precedes the (last) answer in training.

    A string or a prompt/completion example gives its prompt: as is with ``chat=False``; as one
    user turn rendered with the chat template and its generation prompt with ``chat=True``. A
    chat example gives its conversation before its last assistant turn (chat mode only).
    ``chat=None`` uses the chat template when the tokenizer has one.
    """
    if use_chat(tokenizer, chat):
        return render(tokenizer, _messages_before_answer(example_or_prompt), generation_prompt=True)
    if isinstance(example_or_prompt, str):
        return example_or_prompt
    if example_or_prompt.messages is not None:
        raise DataError(_NEEDS_TEMPLATE)
    return example_or_prompt.prompt or ""


def pieces(tokenizer: PreTrainedTokenizerBase, example: Example, chat: bool) -> list[Piece]:
    """Cut an example's full training text into pieces; their texts joined are the full text.

    Raw mode (``chat=False``) gives the prompt then the completion (joined as they are: put the
    separator you want at the end of the prompt). Chat mode renders the example as a conversation.
    """
    if example.messages is None:
        if chat:
            return chat_pieces(tokenizer, _as_turns(example))
        return [Piece(text=example.prompt or "", role=Role.CONTEXT),
                Piece(text=example.completion or "", role=Role.TARGET)]
    if not chat:
        raise DataError(_NEEDS_TEMPLATE)
    return chat_pieces(tokenizer, example.messages)


def _as_turns(example: Example) -> tuple[Message, ...]:
    """A prompt/completion example as a user turn and an assistant turn."""
    return (Message(role="user", content=example.prompt or ""),
            Message(role="assistant", content=example.completion or ""))


def _messages_before_answer(example_or_prompt: Example | str) -> tuple[Message, ...]:
    """The conversation before the last assistant turn; a plain prompt is one user turn."""
    if isinstance(example_or_prompt, str):
        return (Message(role="user", content=example_or_prompt),)
    if example_or_prompt.messages is None:
        return (Message(role="user", content=example_or_prompt.prompt or ""),)
    messages = example_or_prompt.messages
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
    return messages[:last]
