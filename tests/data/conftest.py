"""Tokenizers for the data tests: a hand-made word-level one with a ChatML template, and SmolLM2's."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

SPECIALS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "hi", "hello", "bye", "ciao", "Reverse", "planet", "tenalp", ":", "be", "brief"]
#: ChatML without a default system turn; "\n" vanishes in the word-level tokenizer.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def toy_tokenizer(*, chat_template: str | None = CHATML, bos: bool = False) -> PreTrainedTokenizerBase:
    """Word-level: ids 0-3 are SPECIALS, 4... are WORDS in order; optionally adds ``<s>`` in front."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def token_id(token: str) -> int:
    """The toy tokenizer's id of ``token``."""
    return (SPECIALS + WORDS).index(token)


@pytest.fixture(scope="session")
def toy() -> PreTrainedTokenizerBase:
    return toy_tokenizer()


@pytest.fixture(scope="session")
def smol(default_model_dir) -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer from lorakit's converted cache (converted first on a fresh machine)."""
    return AutoTokenizer.from_pretrained(default_model_dir)
