"""A tiny byte-level BPE tokenizer (GPT-2's kind, which GGUF files hold as ``gpt2``), for the tiny models."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .chat_tokenizer import CHATML

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Byte-level symbols of printable ASCII: the characters themselves, space as "Ġ" and newline as "Ċ".
BYTE_SYMBOLS = [chr(code) for code in range(33, 127)] + ["Ġ", "Ċ"]
BPE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 102 tokens (specials, printable ASCII, three merges) with a ChatML
    template; its ids fit the tiny models' vocabulary of 128, leaving ids 102-127 unused."""
    tokens = BPE_SPECIALS + BYTE_SYMBOLS + ["".join(pair) for pair in BPE_MERGES]
    backend = Tokenizer(models.BPE({token: index for index, token in enumerate(tokens)}, BPE_MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer
