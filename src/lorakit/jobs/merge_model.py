"""``lorakit merge``: a base model with an adapter folded into its weights, written as a full model."""

from __future__ import annotations

from pathlib import Path

from lorakit.core.merge import merge_and_unload
from lorakit.errors import ConfigError
from lorakit.io.directory_kinds import directory_kind
from lorakit.io.metadata import read_metadata
from lorakit.jobs.evaluate import load_directory
from lorakit.jobs.quantized_merge import merge_quantized
from lorakit.quant.quantized_adapter import QUANTIZED_ADAPTER_KIND
from lorakit.train.output import save_model


def merge_into_model(adapter: str | Path, out: str | Path, *, base: str | None = None,
                     into: str | None = None) -> dict | None:
    """Write ``base`` (None: the base the adapter records) with the adapter directory ``adapter`` merged into its
    weights (safetensors, with the tokenizer and ``lorakit.json``, kind ``model``) to ``out``.

    Only a fixed weight update merges: a mixture (its adapters are routed per token) and a whole model (no
    adapter to fold in) are refused by kind, before any model is loaded. An adapter on a quantized base merges
    ``into`` its dequantized base (the default), requantized or into the original weights, with the error that
    introduces measured and written beside the model (:mod:`lorakit.jobs.quantized_merge`): that report is
    returned (None for an exact merge into a full-precision base)."""
    refuse_unmergeable(adapter, "lorakit merge")
    metadata = read_metadata(Path(adapter))
    quantized = metadata is not None and (metadata.base_quantization is not None
                                          or metadata.kind == QUANTIZED_ADAPTER_KIND)
    if into is not None and not quantized:  # refused before any model loads
        raise ConfigError(f"--into {into} is for adapters trained on a quantized base; {adapter} was trained on a "
                          "full-precision one, into which it merges exactly (drop --into)")
    loaded, tokenizer = load_directory(adapter, base)
    out = Path(out)
    if quantized:
        return merge_quantized(loaded.model, tokenizer, Path(adapter), loaded.kind, out, into or "dequantized", base)
    save_model(merge_and_unload(loaded.model), tokenizer, out, origin=f"merge of {adapter}")
    return None


def refuse_unmergeable(adapter: str | Path, command: str) -> None:
    """Refuse, by kind and before any model is loaded, a directory ``adapter`` that holds no fixed weight update
    for ``command`` (named in the message): a mixture (its adapters are routed per token) or a whole model."""
    kind = directory_kind(adapter)
    if kind.routed is not None:
        raise ConfigError(f"{command} cannot merge the {kind.name} directory {adapter}: {kind.routed}")
    if kind.whole_model:
        raise ConfigError(f"{command} cannot merge the {kind.name} directory {adapter}: it is a whole model "
                          "already, with no adapter to fold into a base")
