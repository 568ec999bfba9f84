"""A Llama model (an adapter merged into it first) as one GGUF file for llama.cpp's ``llama`` architecture.

    model = lorakit.merge_and_unload(lorakit.load("runs/r", base).model)
    export_gguf(model, tokenizer, "model.gguf", quant="q8_0")

The file holds the hyper-parameters, the tokenizer (:mod:`lorakit.io.gguf_vocab`) and every weight under
llama.cpp's name, the query and key rows in its order (:mod:`lorakit.io.gguf_llama`), each stored as the
quantization allows (:mod:`lorakit.io.gguf_tensors`); tied embeddings are written once, as llama.cpp expects.
transformers reads the file back (``from_pretrained(directory, gguf_file=name)``) as the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lorakit.core.state import lora_layers
from lorakit.errors import ModelError, StateError
from lorakit.io.gguf_file import refuse_existing, write_gguf
from lorakit.io.gguf_llama import ARCHITECTURE, add_hyperparameters, check_llama_like, llama_cpp_row_order, tensor_name
from lorakit.io.gguf_tensors import encode, quantization
from lorakit.io.gguf_vocab import DEFAULT_PRE_TOKENIZER, add_tokenizer


def export_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: str | Path, *,
                quant: str = "f16", force: bool = False, pre_tokenizer: str = DEFAULT_PRE_TOKENIZER,
                progress: bool = True) -> Path:
    """Write ``model`` (a Llama model with no adapters left: merge them first) and its byte-level BPE
    ``tokenizer`` to the GGUF file ``out``, its matrices stored as ``quant`` (``f16``, ``q8_0``, ``q4_0``).

    An existing ``out`` is refused unless ``force``; a model that is not a plain Llama is refused naming what
    it is, before anything is written. ``pre_tokenizer`` is llama.cpp's name of the tokenizer's pre-tokenizer
    (``tokenizer.ggml.pre``). ``progress`` shows a bar over the tensors. Returns ``out``."""
    out, config, chosen = Path(out), model.config, quantization(quant)
    check_llama_like(config)
    adapted = [name for name, _ in lora_layers(model)]
    if adapted:
        raise StateError(f"the model still has adapters on {len(adapted)} modules ({adapted[0]}, ...); merge them "
                         "first (lorakit.merge_and_unload)")
    refuse_existing(out, force=force)
    tensors = dict(llama_cpp_tensors(model))

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        if config.name_or_path:
            writer.add_name(Path(config.name_or_path).name)
        add_hyperparameters(writer, config)
        writer.add_file_type(chosen.file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer=pre_tokenizer)
        head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
        for name, tensor in tqdm(tensors.items(), desc="GGUF tensors", unit="tensor", disable=not progress):
            data, tensor_type = encode(tensor, chosen, head=name == head)
            writer.add_tensor(name, data, raw_dtype=tensor_type)

    return write_gguf(out, ARCHITECTURE, fill)


def llama_cpp_tensors(model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of ``model`` under its llama.cpp name, rows in llama.cpp's order; the output head is left
    out when it is tied to the embeddings. A weight llama.cpp has no name for is refused by name."""
    config = model.config
    for key, tensor in model.state_dict().items():
        module, _, kind = key.rpartition(".")
        if module == "lm_head" and config.tie_word_embeddings:
            continue
        name = tensor_name(config, module) if kind == "weight" else None
        if name is None:
            raise ModelError(f"the model's tensor {key!r} has no counterpart in llama.cpp's {ARCHITECTURE!r} "
                             "architecture")
        yield f"{name}.weight", llama_cpp_row_order(tensor, config, name)
