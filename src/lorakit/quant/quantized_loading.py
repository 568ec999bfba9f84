"""Loading a base model quantized as it loads, one weight at a time: :func:`load_quantized_base`.

The model is built as a skeleton (parameters on the meta device: :mod:`lorakit.models.skeleton`); its safetensors
are then read tensor by tensor, and each linear layer's weight is quantized the moment it is read
(:mod:`lorakit.quant.base_schemes`), so the process never holds more than one full-precision linear weight beyond
the quantized model (the file is read, not memory-mapped: :mod:`lorakit.io.streamed_tensors`). Every
``nn.Linear`` but the output head is quantized, as QLoRA does; embeddings, norms and the head stay in full
precision.

``bnb-nf4`` and ``bnb-fp4`` are loaded by transformers itself with a ``BitsAndBytesConfig`` (bitsandbytes'
``Linear4bit``), as users of QLoRA elsewhere load them.

``nf4`` bases are cached (:mod:`lorakit.quant.quantized_cache`), so later loads read the codes instead of
quantizing again; ``int8`` is quantized on every load (a per-row absmax pass; bitsandbytes offers no public way
to rebuild its layer from stored codes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lorakit.errors import FormatError, ModelError
from lorakit.io.base_quantization import register_base_loader
from lorakit.io.streamed_tensors import stream_tensors, tensor_count
from lorakit.models.freed_memory import release_freed_memory
from lorakit.models.load import finish_loading, load_model, load_tokenizer, resolve_source
from lorakit.models.skeleton import causal_lm_skeleton, check_filled, set_parameter
from lorakit.quant.base_schemes import SCHEMES, base_scheme
from lorakit.quant.model_quantization import quantizable_linears, replace_module
from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.quantized_cache import cache_path, read_cached, write_cache
from lorakit.quant.quantized_tensor import NFTensor


def weight_files(source: Path) -> list[Path]:
    """The safetensors files holding the model in the directory ``source`` (one, or a sharded set)."""
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{source} holds no *.safetensors weights (lorakit never reads pickled .bin weights)")
    return files


def _checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        yield from stream_tensors(file)


def fill_quantized(model: PreTrainedModel, tensors: Iterator[tuple[str, torch.Tensor]], targets: list[str],
                   build: Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module], *, progress: bool = False,
                   total: int | None = None, desc: str = "quantizing the base") -> None:
    """Fill the skeleton ``model`` from ``(name, tensor)`` pairs, replacing each linear layer ``targets`` names by
    ``build(module_name, weight, bias)`` as soon as its weight (and bias, if it has one) has been read."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    needs_bias = {name: model.get_submodule(name).bias is not None for name in targets}
    for key, tensor in tqdm(tensors, total=total, desc=desc, unit="tensor", disable=not progress):
        module_name, _, leaf = key.rpartition(".")
        if module_name not in needs_bias:
            set_parameter(model, key, tensor)
            continue
        parts = pending.setdefault(module_name, {})
        parts[leaf] = tensor.to(torch.float32)
        if "weight" in parts and ("bias" in parts or not needs_bias[module_name]):
            replace_module(model, module_name, build(module_name, parts["weight"], parts.get("bias")).eval())
            del pending[module_name]
            release_freed_memory()  # else glibc keeps the quantizer's temporaries: +0.6 GB on the default model
    if pending:
        raise ModelError(f"the checkpoint lacks the weight or bias of {sorted(pending)[:3]}: it is incomplete")
    check_filled(model)


def load_quantized_base(name_or_path: str | os.PathLike[str], scheme: str = "nf4", *, cache: bool = True,
                        progress: bool = False) -> tuple[PreTrainedModel, object]:
    """The causal language model ``name_or_path`` names (as :func:`lorakit.load_model` resolves it; a local
    directory or the default model) with its linear layers quantized under ``scheme`` as they load, and its
    tokenizer; the model in eval mode. With ``cache``, ``nf4`` reads (or first writes) the quantized base cached
    under ``lorakit_home()/quantized``."""
    chosen = base_scheme(scheme)
    source = local_source(name_or_path, "--quantize")
    files = weight_files(Path(source))
    if chosen.transformers_config is not None:
        return _load_by_transformers(source, name_or_path, chosen.transformers_config())
    model = causal_lm_skeleton(AutoConfig.from_pretrained(source))
    targets = quantizable_linears(model)
    cached = cache_path(files, chosen.name) if cache and chosen.cached else None
    if cached is not None and cached.is_dir():
        read_cached(model, cached, targets)
    else:
        fill_quantized(model, _checkpoint_tensors(files), targets,
                       lambda _name, weight, bias: chosen.quantize(weight, bias), progress=progress,
                       total=sum(map(tensor_count, files)))
        if cached is not None:
            write_cache(model, cached, targets, source=source)
    return finish_loading(model, load_tokenizer(source, name_or_path), source)


def load_with_quantized_linears(name_or_path: str | os.PathLike[str], quantized: Mapping[str, NFTensor], *,
                                progress: bool = False) -> tuple[PreTrainedModel, object]:
    """The causal language model ``name_or_path`` names, with each linear layer that ``quantized`` names built as
    an :class:`NFLinear` of its stored weight (the checkpoint's bias kept) while the checkpoint is read, and its
    tokenizer; the model in eval mode. The full-precision weights of those layers are read one at a time and
    dropped, so the process never holds them all (LQ-LoRA's and LoftQ's bases, rebuilt without the fp32 model)."""
    source = local_source(name_or_path, "a quantized base")
    files = weight_files(Path(source))
    model = causal_lm_skeleton(AutoConfig.from_pretrained(source))
    layers = dict(model.named_modules())
    for module_name, weight in quantized.items():
        layer = layers.get(module_name)
        if type(layer) is not nn.Linear or tuple(layer.weight.shape) != tuple(weight.shape):
            found = "no such module" if layer is None else f"a {type(layer).__name__} of {_shape_of(layer)}"
            raise FormatError(f"a quantized base {tuple(weight.shape)} is stored for {module_name!r}, where "
                              f"{os.fspath(name_or_path)!r} has {found}: it belongs to another model")

    def stored(module_name: str, _weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return NFLinear(quantized[module_name], bias)

    fill_quantized(model, _checkpoint_tensors(files), list(quantized), stored, progress=progress,
                   total=sum(map(tensor_count, files)), desc="loading the quantized base")
    return finish_loading(model, load_tokenizer(source, name_or_path), source)


def _shape_of(layer: nn.Module) -> object:
    weight = getattr(layer, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else "no weight"


def local_source(name_or_path: str | os.PathLike[str], what: str) -> str:
    """The local directory ``name_or_path`` resolves to; a :class:`ModelError` saying ``what`` needs it when it is
    not one."""
    source = resolve_source(name_or_path)
    if not Path(source).is_dir():
        raise ModelError(f"{what} needs the model's files on disk; {os.fspath(name_or_path)!r} is not a local "
                         "directory (hub ids are not downloaded)")
    return source


def _load_by_transformers(source: str, name_or_path: str | os.PathLike[str],
                          quantization_config: object) -> tuple[PreTrainedModel, object]:
    """The model at ``source`` as transformers loads it under ``quantization_config`` (bitsandbytes quantizes
    each weight as it is placed; the output head stays in full precision)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization_config,
                                                     dtype=torch.float32, device_map="cpu", use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"{os.fspath(name_or_path)!r}: transformers could not load it quantized ({error})") from None
    return finish_loading(model, load_tokenizer(source, name_or_path), source)


def load_base(name_or_path: str | os.PathLike[str], quantize: str | None = None, *,
              progress: bool = False) -> tuple[PreTrainedModel, object]:
    """The base model and tokenizer: as :func:`lorakit.load_model` gives them (``quantize`` None), or quantized
    under the scheme ``quantize`` names as they load (:func:`load_quantized_base`)."""
    if quantize is None:
        return load_model(name_or_path)
    return load_quantized_base(name_or_path, quantize, progress=progress)


for _name in SCHEMES:
    register_base_loader(_name, lambda name_or_path, scheme=_name: load_quantized_base(name_or_path, scheme))
