"""A Hugging Face byte-level BPE tokenizer as GGUF's ``tokenizer.ggml.*`` fields (llama.cpp's ``gpt2`` model):
the tokens in id order with their types, the merges, the special token ids and the chat template.
"""

from __future__ import annotations

import json

import gguf
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lorakit.errors import ModelError

DEFAULT_PRE_TOKENIZER = "default"
"""llama.cpp's pre-tokenizer when the model's own is not known to it by name (GPT-2's splitting rules)."""


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int, *,
                  pre_tokenizer: str = DEFAULT_PRE_TOKENIZER) -> None:
    """Write ``tokenizer`` (a fast byte-level BPE tokenizer) for a model of ``vocab_size`` embedding rows; ids
    the tokenizer does not use are written as unused ``[PAD<id>]`` tokens. ``pre_tokenizer`` is llama.cpp's name
    of the model's pre-tokenizer (``tokenizer.ggml.pre``: ``"smollm"``, ``"llama-bpe"``, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2'); this tokenizer's "
                         f"model is {model.get('type') or type(tokenizer).__name__!r}")
    tokens, token_types = token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]])
    for add_id, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add_id(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def token_table(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and type (special added tokens are control tokens, other added tokens
    user-defined, ids without a token unused); a tokenizer with ids past ``vocab_size`` is refused."""
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has token id {max(by_id)}, but the model has only {vocab_size} embedding "
                         "rows")
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            token_types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            token_types.append(gguf.TokenType.NORMAL)
    return tokens, token_types
