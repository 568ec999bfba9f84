"""``lorakit export``: an adapter directory as GGUF files for llama.cpp, merged into its base model
(``--format gguf``) or alone as a LoRA file (``--format gguf-lora``).

    lorakit export --format gguf --quant q8_0 --out model.gguf runs/r
    lorakit export --format gguf-lora --out adapter.gguf runs/r
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.core.merge import merge_and_unload
from lorakit.errors import ConfigError
from lorakit.io.directory_kinds import Loaded
from lorakit.io.gguf_export import export_gguf
from lorakit.io.gguf_file import refuse_existing
from lorakit.io.gguf_lora import export_gguf_lora
from lorakit.io.gguf_vocab import DEFAULT_PRE_TOKENIZER
from lorakit.jobs.evaluate import load_directory
from lorakit.jobs.merge_model import refuse_unmergeable
from lorakit.models import smollm2
from lorakit.quant.dequantize import dequantize_bases, dequantize_linears
from lorakit.quant.quantized_adapter import QUANTIZED_ADAPTER_KIND

COMMAND = "lorakit export"


def export_merged_gguf(adapter: str | Path, out: str | Path, *, base: str | None = None, quant: str = "f16",
                       force: bool = False, progress: bool = True) -> Path:
    """Write ``base`` (None: the base the adapter records) with the adapter directory ``adapter`` merged into
    it to the GGUF file ``out`` (:func:`lorakit.io.gguf_export.export_gguf`, matrices as ``quant``). A quantized
    base is dequantized first, so the file holds ``dequantize(Q) + s B A``, the model the adapter was trained as,
    before the file's own quantization (``lorakit merge --into dequantized``)."""
    loaded, tokenizer = _load(adapter, out, base, force)
    dequantize_bases(loaded.model)
    model = merge_and_unload(loaded.model)
    dequantize_linears(model)
    known_pre_tokenizer = model.config.name_or_path == smollm2.HUB_ID
    return export_gguf(model, tokenizer, out, quant=quant, force=force, progress=progress,
                       pre_tokenizer=smollm2.LLAMA_CPP_PRE_TOKENIZER if known_pre_tokenizer else DEFAULT_PRE_TOKENIZER)


def export_lora_gguf(adapter: str | Path, out: str | Path, *, base: str | None = None, force: bool = False) -> Path:
    """Write the adapter directory ``adapter`` alone to the GGUF LoRA file ``out``
    (:func:`lorakit.io.gguf_lora.export_gguf_lora`), after checking that it loads into ``base`` (None: the
    base it records), whose hyper-parameters the file's layout depends on."""
    loaded, _ = _load(adapter, out, base, force)
    if loaded.kind == QUANTIZED_ADAPTER_KIND:
        raise ConfigError(f"{adapter} is an adapter trained on quantized bases (LQ-LoRA / LoftQ): alone, a LoRA file "
                          "would be applied to the full-precision base, which is not the model it was trained on")
    return export_gguf_lora(adapter, out, config=loaded.base.config, force=force)


def _load(adapter: str | Path, out: str | Path, base: str | None, force: bool) -> tuple[Loaded, Any]:
    """The adapter loaded into its base, once the directory's kind and ``out`` are known to be acceptable."""
    refuse_unmergeable(adapter, COMMAND)
    refuse_existing(Path(out), force=force)
    return load_directory(adapter, base)
