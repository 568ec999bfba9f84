"""Token ids and loss labels of an example: ``encode(example, tokenizer, chat=..., max_length=...)``.

Labels follow the Hugging Face convention: ``labels[i] == input_ids[i]`` where the loss applies
(the model shifts them itself) and ``IGNORE_INDEX`` (-100) elsewhere.

Tokenisation at piece boundaries. The text is tokenised incrementally: after each piece, the text
so far is tokenised as a whole; when the ids found so far are a prefix of that, the new ids are
the rest, so that the ids are exactly those of tokenising the full text. When a boundary merges
across the pieces (raw ``"planet"`` + ``"s"`` is one token ``planets``), the new piece is
tokenised on its own and appended instead: the ids then differ from tokenising the full text, but
the prompt's ids are exactly those the model sees at generation time (:func:`prompt_ids`), which is
what training must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit.data.chat import Role
from lorakit.data.example import Example
from lorakit.data.formatting import pieces, prompt_text, use_chat
from lorakit.errors import DataError

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """One example as token ids and loss labels of the same length."""

    input_ids: list[int]
    """Token ids, starting with the prompt's ids."""
    labels: list[int]
    """``input_ids[i]`` where the loss applies, ``IGNORE_INDEX`` elsewhere."""
    adapter: str | None = None
    """The adapter this example trains when several are trained in one batch (None: the active one)."""
    task: str | None = None
    """The example's task (the JSONL ``"task"`` field), for mixtures that learn to route by task."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise DataError(
                f"Encoded has {len(self.input_ids)} input_ids but {len(self.labels)} labels; "
                f"they must have the same length"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def supervised(self) -> int:
        """How many tokens the loss applies to (0 when truncation cut off the whole answer)."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(
    example: Example, tokenizer: PreTrainedTokenizerBase, *, chat: bool | None, max_length: int | None
) -> Encoded:
    """Tokenise an example and label the tokens the loss is computed on.

    Supervised: a completion and the token that ends it (the tokenizer's EOS in raw mode, which is
    appended; in chat mode the template's end-of-turn token, e.g. ``<|im_end|>``), or every
    assistant turn's content and its end-of-turn token. Everything else (prompt, system and user
    turns, template markup, a BOS token) is ``IGNORE_INDEX``. ``chat=None`` uses the chat template
    when the tokenizer has one.

    Truncation keeps the first ``max_length`` tokens (``None``: no limit). A completion that is
    cut off keeps its first tokens supervised but loses its end token, so that example does not
    teach the model to stop; an example whose prompt fills ``max_length`` has no supervised token
    at all (``Encoded.supervised == 0``) and adds nothing to the loss.
    """
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be a positive number of tokens or None, got {max_length}")
    chat = use_chat(tokenizer, chat)
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    for piece in pieces(tokenizer, example, chat):
        text += piece.text
        new = _new_ids(tokenizer, ids, text, piece.text)
        labels.extend(_labels(tokenizer, new, piece.role))
        ids.extend(new)
    if not chat:
        leading = leading_special_ids(tokenizer)
        ids, labels = leading + ids, [IGNORE_INDEX] * len(leading) + labels
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("raw (non-chat) training needs a tokenizer with an EOS token to end completions")
        ids.append(eos)
        labels.append(eos)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(input_ids=ids, labels=labels, task=example.task)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, example_or_prompt: Example | str, chat: bool | None
) -> list[int]:
    """The ids a model continues at generation time: those ``encode`` starts with, untruncated."""
    chat = use_chat(tokenizer, chat)
    text = prompt_text(tokenizer, example_or_prompt, chat)
    return _ids(tokenizer, text) if chat else leading_special_ids(tokenizer) + _ids(tokenizer, text)


def leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special ids the tokenizer puts before a text (e.g. ``[bos]``; ``[]`` for many models).

    Chat templates write their own special tokens, so rendered conversations are tokenised without
    these; raw prompts get them, as ``tokenizer(text)`` would add them.
    """
    plain = _ids(tokenizer, "a")
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokenizer's special tokens, including added ones marked special (``<|im_end|>``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def _new_ids(tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str, piece: str) -> list[int]:
    """The ids that ``piece``, the end of ``text``, adds after ``ids`` (the module docstring's rule)."""
    whole = _ids(tokenizer, text)
    if whole[: len(ids)] == ids:
        return whole[len(ids):]
    return _ids(tokenizer, piece)


def _labels(tokenizer: PreTrainedTokenizerBase, new: list[int], role: Role) -> list[int]:
    """Labels of a piece's ids: all, none, or (CLOSE) up to and including the first special id."""
    if role is Role.TARGET:
        return list(new)
    if role is Role.CLOSE:
        specials = special_ids(tokenizer)
        end = next((i + 1 for i, token in enumerate(new) if token in specials), 0)
        return list(new[:end]) + [IGNORE_INDEX] * (len(new) - end)
    return [IGNORE_INDEX] * len(new)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without the tokenizer's own special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS, else 0 (padding is always
    masked out of attention and loss, so any valid id does)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
