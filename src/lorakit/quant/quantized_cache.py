"""The on-disk cache of bases quantized by :func:`~lorakit.quant.quantized_loading.load_quantized_base`.

One directory per (weight files, scheme) under ``lorakit_home()/quantized/<key>``, where the key hashes each
weight file's resolved path, size and modification time with the scheme's name and this format's version, so a
changed checkpoint is quantized afresh. It holds::

    linears.safetensors   the quantized linear weights (:mod:`lorakit.quant.quantized_files`)
    rest.safetensors      every other parameter, and the quantized linears' biases
    source.json           what was quantized: the model directory, the scheme

It is built in a temporary sibling and renamed into place (:func:`lorakit.models.atomic.build_atomically`), so a
reader sees it complete or not at all. Delete it to quantize again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from lorakit.errors import FormatError, ModelError
from lorakit.io.files import load_tensors, save_json, save_tensors
from lorakit.models.atomic import build_atomically
from lorakit.models.home import lorakit_home
from lorakit.models.skeleton import check_filled, set_parameter
from lorakit.quant.model_quantization import replace_module
from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.quantized_files import load_quantized, save_quantized

FORMAT = 1
LINEARS_FILE = "linears.safetensors"
REST_FILE = "rest.safetensors"
SOURCE_FILE = "source.json"


def cache_path(files: list[Path], scheme: str) -> Path:
    """Where the base in ``files`` quantized under ``scheme`` is cached (it may not exist yet)."""
    stamps = [[str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns] for file in files]
    key = hashlib.sha256(json.dumps([FORMAT, scheme, stamps]).encode()).hexdigest()[:24]
    return lorakit_home() / "quantized" / key


def write_cache(model: nn.Module, target: Path, targets: list[str], *, source: str) -> None:
    """Cache ``model``, whose modules ``targets`` are :class:`NFLinear`, at ``target``."""
    layers = {name: model.get_submodule(name) for name in targets}
    rest = {name: param.detach() for name, param in model.named_parameters()}
    rest.update({f"{name}.bias": layer.bias for name, layer in layers.items() if layer.bias is not None})

    def build(directory: Path) -> None:
        save_quantized(directory / LINEARS_FILE, {name: layer.quantized for name, layer in layers.items()})
        save_tensors(directory / REST_FILE, rest)
        save_json(directory / SOURCE_FILE, {"format": FORMAT, "source": source,
                                            "scheme": next(iter(layers.values())).config.name})

    build_atomically(target, build)


def read_cached(model: nn.Module, cached: Path, targets: list[str]) -> None:
    """Fill the skeleton ``model`` from the cache at ``cached``; a damaged cache is refused, saying to delete it."""
    try:
        linears = load_quantized(cached / LINEARS_FILE)
        rest = load_tensors(cached / REST_FILE)
    except FormatError as error:
        raise ModelError(f"the quantized base cached at {cached} is damaged ({error}); delete that directory and "
                         "lorakit will quantize the base again") from None
    if set(linears) != set(targets):
        raise ModelError(f"the quantized base cached at {cached} holds other layers than the model's; delete that "
                         "directory and lorakit will quantize the base again")
    for name, quantized in linears.items():
        replace_module(model, name, NFLinear(quantized, rest.pop(f"{name}.bias", None)).eval())
    for name, tensor in rest.items():
        set_parameter(model, name, tensor)
    check_filled(model)
