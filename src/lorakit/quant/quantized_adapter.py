"""The ``quantized-adapter`` directory kind: a LoRA adapter trained on bases that were quantized for it (LQ-LoRA,
LoftQ), with those bases beside it, so that :func:`lorakit.load` rebuilds the model the adapter was trained on.

The adapter alone is an ordinary PEFT adapter, but it belongs to ``Q``, not to the full-precision ``W``: LQ-LoRA
starts it at ``L1 L2 ~= W - Q``, so on ``W`` it would count that difference twice. The directory holds::

    adapter_model.safetensors, adapter_config.json    the adapter (PEFT's layout)
    quantized_bases.safetensors                       each adapted module's quantized base weight Q
    lorakit.json                                      {"format": 1, "kind": "quantized-adapter"}

Loading with no model builds the recorded base as a skeleton and fills it from its checkpoint, each adapted
linear becoming an :class:`NFLinear` holding its ``Q`` (the bias kept) as its fp32 weight is read and dropped, so
the process never holds the full-precision model (:func:`~lorakit.quant.quantized_loading.load_with_quantized_linears`);
then the adapter goes on. Loading into a given model puts the adapter on it and replaces the adapted bases the same
way. PEFT reads the adapter files too, but onto the full-precision base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.core.kinds import kind_of
from lorakit.errors import FormatError
from lorakit.io.adapter_kind import ADAPTER, DEFAULT_NAME, describe_adapter
from lorakit.io.adapters import CONFIG_FILE, adapter_tensors, load_adapter, peft_config, write_adapter_files
from lorakit.io.directory_kinds import DirectoryKind, Loaded, register_kind
from lorakit.io.files import load_json
from lorakit.io.recorded_base import recorded_name
from lorakit.quant.nf_config import bits_per_parameter
from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.quantized_files import load_quantized, quantized_writer
from lorakit.quant.quantized_loading import load_with_quantized_linears
from lorakit.quant.quantized_tensor import NFTensor

QUANTIZED_ADAPTER_KIND = "quantized-adapter"
QUANTIZED_BASES_FILE = "quantized_bases.safetensors"


def quantize_bases(model: nn.Module, quantized: Mapping[str, NFTensor]) -> None:
    """Replace the base of each adapted layer named in ``quantized`` by an :class:`NFLinear` holding its weight
    (the bias kept, on the base's device, in the base's train/eval mode)."""
    for module_name, weight in quantized.items():
        layer = model.get_submodule(module_name)
        base = layer.base_layer
        if tuple(base.weight.shape) != tuple(weight.shape):
            raise FormatError(f"the quantized base of {module_name!r} is {tuple(weight.shape)}, but the model's "
                              f"weight there is {tuple(base.weight.shape)}: it belongs to another model")
        layer.base_layer = NFLinear(weight, base.bias).to(base.weight.device).train(base.training)
        layer.kind = kind_of(layer.base_layer, module_name)


def save_quantized_adapter(model: nn.Module, path: str | Path, quantized: Mapping[str, NFTensor],
                           name: str = "default", origin: str | None = None) -> Path:
    """Write adapter ``name`` with the quantized bases it was trained on, every file atomically together."""
    directory = Path(path)
    write_adapter_files(directory, adapter_tensors(model, name), peft_config(model, name), origin,
                        kind=QUANTIZED_ADAPTER_KIND, beside={QUANTIZED_BASES_FILE: quantized_writer(quantized)})
    return directory


def _load(directory: Path, model: nn.Module | None) -> Loaded:
    quantized = load_quantized(directory / QUANTIZED_BASES_FILE)  # checked before the model changes
    if model is None:  # built with Q in place as the checkpoint is read: never the whole fp32 model in memory
        recorded = recorded_name(load_json(directory / CONFIG_FILE).get("base_model_name_or_path"),
                                 directory / CONFIG_FILE)
        base, tokenizer = load_with_quantized_linears(recorded, quantized)
        name = load_adapter(base, directory, DEFAULT_NAME)
        return Loaded(kind=QUANTIZED_ADAPTER_KIND, path=directory, model=base, base=base, tokenizer=tokenizer,
                      adapters=(name,))
    loaded = ADAPTER.load(directory, model)
    missing = set(quantized) - set(dict(loaded.base.named_modules()))
    if missing:
        raise FormatError(f"{directory / QUANTIZED_BASES_FILE}: quantized bases for modules the model does not "
                          f"have: {sorted(missing)[:5]}")
    quantize_bases(loaded.base, quantized)
    return dataclasses.replace(loaded, kind=QUANTIZED_ADAPTER_KIND)


def _describe(directory: Path) -> dict[str, Any]:
    bases = load_quantized(directory / QUANTIZED_BASES_FILE)
    return {**describe_adapter(directory), "quantized_bases": {
        name: {"shape": list(q.shape), "bits_per_parameter": bits_per_parameter(q.config)}
        for name, q in bases.items()}}


QUANTIZED_ADAPTER = register_kind(DirectoryKind(
    name=QUANTIZED_ADAPTER_KIND, holds="a LoRA adapter with the quantized bases it was trained on (LQ-LoRA, LoftQ)",
    load=_load, describe=_describe))
