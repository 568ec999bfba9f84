"""``load_model``: turn a model name, local directory or hub id into a (model, tokenizer) pair."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lorakit.errors import ModelError
from lorakit.io.metadata import read_metadata
from lorakit.models import smollm2

DEFAULT_MODEL = "smollm2-135m"
#: Names of the default model, compared case-insensitively; its hub id (which adapters trained on it record)
#: is served from the local package, since nothing is downloaded.
_DEFAULT_NAMES = frozenset({DEFAULT_MODEL, "smollm2-135m-instruct", smollm2.HUB_ID.lower()})


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, the model in eval mode.

    ``name_or_path`` is ``"smollm2-135m"`` (or ``"SmolLM2-135M-Instruct"``, any case) for the
    default model, converted from its GGUF on first use; a local directory in the Hugging Face
    layout; or a hub id, which works when transformers can fetch it or has it cached. Weights are
    read from safetensors only, never from pickled ``.bin`` files. The tokenizer gets its end of
    sequence token as padding token when it has none.
    """
    source = resolve_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ModelError(_failure_message(os.fspath(name_or_path), source, error)) from error
    if device is not None:
        model.to(device)
    return finish_loading(model, load_tokenizer(source, name_or_path), source)


def load_tokenizer(source: str, name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer at ``source`` (what :func:`resolve_source` gave for ``name_or_path``)."""
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelError(_failure_message(os.fspath(name_or_path), source, error)) from error


def finish_loading(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``model`` in eval mode, named as published when it is the default model, and its padding token set:
    the end of sequence token where the tokenizer has none."""
    if source == str(smollm2.cache_dir()):
        model.config._name_or_path = smollm2.HUB_ID  # saved adapters name the published base
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def resolve_source(name_or_path: str | os.PathLike[str]) -> str:
    """Return what ``from_pretrained`` should read: a local directory or a hub id."""
    text = os.fspath(name_or_path)
    if text.lower() in _DEFAULT_NAMES:
        return str(smollm2.ensure_cached())
    path = Path(text).expanduser()
    if path.is_dir():
        _refuse_other_lorakit_kind(path, text)
        return str(path)
    if path.exists():
        raise ModelError(f"{text!r} is a file; pass the directory holding config.json instead")
    if _looks_like_path(text):
        raise ModelError(
            f"no model directory at {text!r}; pass an existing directory or {DEFAULT_MODEL!r}"
        )
    return text


def _refuse_other_lorakit_kind(path: Path, text: str) -> None:
    """Refuse a directory whose ``lorakit.json`` names a kind other than ``model``: ``from_pretrained`` would read
    its ``config.json`` and leave the layers lorakit stores elsewhere (an ``l4q-model``'s quantized linears)
    randomly initialised."""
    metadata = read_metadata(path)
    if metadata is not None and metadata.kind != "model":
        raise ModelError(f"{text!r} holds a lorakit {metadata.kind!r} directory, not a base model; pass it as "
                         f"--adapter (in Python: lorakit.load)")


def _looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be a filesystem path: hub ids are ``name`` or ``owner/name``."""
    if Path(text).is_absolute() or text.startswith((".", "~")):
        return True
    return text.count("/") > 1 or "\\" in text


def _failure_message(name: str, source: str, error: Exception) -> str:
    """Explain a failed ``from_pretrained`` call and what the user can pass instead."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(source).is_dir():
        return (
            f"cannot load a model and tokenizer from {source}: {reason} (lorakit expects "
            f"config.json, *.safetensors weights and tokenizer files there)"
        )
    return (
        f"cannot load {name!r}: it is not a local directory, and loading it as a Hugging Face hub "
        f"id failed ({reason}); pass the path of a local model directory, or {DEFAULT_MODEL!r} "
        f"for the default model"
    )
