"""Helpers shared by the tests: tiny models (:mod:`.tiny_models`), tokenizers (:mod:`.chat_tokenizer`,
:mod:`.bpe_tokenizer`), example data (:mod:`.example_data`), an interrupted training run (:mod:`.interrupt`) and damaged
safetensors files (:mod:`.tensor_files`), torchrun command lines (:mod:`.torchrun`)."""

from .bpe_tokenizer import BPE_SPECIALS, bpe_tokenizer
from .chat_tokenizer import CHAT_SPECIALS, CHATML, char_tokenizer
from .example_data import copy_examples, labelled_batch, reference
from .interrupt import run_interrupted
from .tensor_files import read_tensors, rewrite_tensors
from .tiny_models import (
    LORA,
    VOCAB,
    TinyConvNet,
    adapted,
    adapter_model,
    logits,
    perturb,
    tiny_gpt2,
    tiny_llama,
    token_batch,
)

__all__ = [
    "BPE_SPECIALS", "CHATML", "CHAT_SPECIALS", "LORA", "VOCAB", "TinyConvNet", "adapted", "adapter_model",
    "bpe_tokenizer", "char_tokenizer", "copy_examples", "labelled_batch", "logits", "perturb", "read_tensors",
    "reference", "rewrite_tensors", "run_interrupted", "tiny_gpt2", "tiny_llama", "token_batch",
]
