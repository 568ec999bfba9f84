"""Saving and loading adapters in the PEFT format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
``lora_embedding_B`` for embeddings), ``A`` (r, in) and ``B`` (out, r), exactly as PEFT writes them,
so PEFT, vLLM and LoRAX load lorakit adapters and lorakit loads theirs. Loading validates everything
(keys, shapes, finiteness, the base model) before it touches the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.core.inject import find_targets
from lorakit.core.kinds import Conv1DKind, kind_of
from lorakit.core.layer import LoraLayer
from lorakit.core.lifecycle import attach, check_adapter_name
from lorakit.core.state import model_state
from lorakit.errors import AdapterError, FormatError, TargetError
from lorakit.io.base_quantization import adapter_quantization
from lorakit.io.files import json_writer, load_json, load_tensors, tensor_writer, write_all_atomically
from lorakit.io.metadata import METADATA_FILE, metadata_writer
from lorakit.io.peft_config import from_peft_dict, to_peft_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
ADAPTER_KIND = "adapter"  # lorakit.json's kind for every PEFT-format adapter lorakit writes


def _resolve_name(model: nn.Module, name: str | None) -> str:
    state = model_state(model)
    if name is not None:
        state.require(name)
        return name
    if len(state.adapters) == 1:
        return next(iter(state.adapters))
    active = list(state.routing.standing.weights)
    if len(active) == 1:
        return active[0]
    raise AdapterError(f"the model holds adapters {sorted(state.adapters)}; say which one to save with name=")


def base_model_name(model: nn.Module) -> str | None:
    """The name or path the model was loaded from, as recorded in adapter configs."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: ``CAUSAL_LM`` for causal language models, else ``None``."""
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's keys, at full rank, with CoDyRA's gates folded into ``A``."""
    tensors = {}
    for module_name in model_state(model).require(name).modules:
        layer = model.get_submodule(module_name)
        key_a, key_b = layer.kind.peft_keys
        adapter = layer.adapters[name]
        tensors[f"{KEY_PREFIX}{module_name}.{key_a}"] = adapter.gated_A().detach()
        tensors[f"{KEY_PREFIX}{module_name}.{key_b}"] = adapter.B
    return tensors


def save_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the only or only active one) to directory ``path`` in PEFT format.

    Both files are written to temporary names first and renamed into place only once both are complete,
    so a failed or killed save never leaves a half-written adapter over a good one. ``lorakit.json`` records the
    quantization of the adapted layers' bases, if any (:mod:`lorakit.io.base_quantization`). Returns the directory.
    """
    name = _resolve_name(model, name)
    directory = Path(path)
    write_adapter_files(directory, adapter_tensors(model, name), peft_config(model, name),
                        base_quantization=adapter_quantization(model, name))
    return directory


def peft_config(model: nn.Module, name: str) -> dict:
    """Adapter ``name``'s ``adapter_config.json`` object, as :func:`save_adapter` writes it."""
    record = model_state(model).require(name)
    layers = [model.get_submodule(m) for m in record.modules]
    return to_peft_dict(record.config, record.modules, base_model=base_model_name(model), task_type=task_type(model),
                        fan_in_fan_out=any(isinstance(layer.kind, Conv1DKind) for layer in layers))


def write_adapter_files(directory: Path, tensors: dict[str, torch.Tensor], config: dict, origin: str | None = None,
                        *, kind: str = ADAPTER_KIND,
                        beside: Mapping[str, Callable[[Path], None]] | None = None,
                        base_quantization: str | None = None) -> None:
    """Write an adapter's tensors, ``adapter_config.json``, ``lorakit.json`` (``kind``, with ``origin`` and
    ``base_quantization`` if given) and the files ``beside`` it (file name -> writer) to ``directory``, all
    atomically together (see
    :func:`save_adapter`)."""
    write_all_atomically({directory / WEIGHTS_FILE: tensor_writer(tensors),
                          directory / CONFIG_FILE: json_writer(config),
                          directory / METADATA_FILE: metadata_writer(kind, origin, base_quantization),
                          **{directory / file: write for file, write in (beside or {}).items()}})


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> tuple[LoraConfig, dict, dict[str, torch.Tensor]]:
    """The config, the raw ``adapter_config.json`` object and the tensors of the adapter at ``path``."""
    directory = Path(path)
    if not directory.is_dir():
        raise FormatError(f"{directory}: no such adapter directory")
    raw = load_json(directory / CONFIG_FILE)
    config = from_peft_dict(raw, directory / CONFIG_FILE)
    return config, raw, load_tensors(weights_file(directory), allow_pickle=allow_pickle)


def weights_file(directory: Path) -> Path:
    """The weight file of the adapter in ``directory``: the safetensors file, else a pickle beside it."""
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() and (directory / PICKLED_WEIGHTS_FILE).is_file():
        weights = directory / PICKLED_WEIGHTS_FILE
    return weights


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, *, allow_pickle: bool = False,
                 activate: bool = True, trainable: bool = False, check_base: bool = True) -> str:
    """Load the PEFT-format adapter at ``path`` into ``model`` as ``name`` (default ``"default"``).

    Every key, shape and value is checked before the model changes; an error names the file and the
    tensor. With ``check_base`` a config recorded for another base model is refused. The adapter is
    frozen unless ``trainable`` and becomes the only active one if ``activate``. Returns the name.
    """
    name = "default" if name is None else name
    check_adapter_name(name)
    config, raw, tensors = read_adapter(path, allow_pickle=allow_pickle)
    if check_base:
        _check_base(raw.get("base_model_name_or_path"), base_model_name(model), Path(path) / CONFIG_FILE)
    modules = dict(model.named_modules())
    try:
        targets = find_targets(model, config)
    except TargetError as err:  # the file does not fit this model: say which file
        raise FormatError(f"{Path(path) / CONFIG_FILE}: {err}") from None
    expected = {}
    for module_name in targets:
        module = modules[module_name]
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = kind_of(base, module_name)
        shape_a, shape_b = kind.shapes(base, config.rank_for(module_name))
        key_a, key_b = kind.peft_keys
        expected[f"{KEY_PREFIX}{module_name}.{key_a}"] = shape_a
        expected[f"{KEY_PREFIX}{module_name}.{key_b}"] = shape_b
    weights = weights_file(Path(path))
    tensors = _drop_unchanged_base_weights(tensors, model, weights)
    _check_tensors(tensors, expected, weights)
    attach(model, config, name, activate=activate, trainable=trainable)
    with torch.no_grad():
        for key, value in adapter_tensors(model, name).items():
            value.copy_(tensors[key])
    return name


def _drop_unchanged_base_weights(tensors: dict[str, torch.Tensor], model: nn.Module,
                                 source: Path) -> dict[str, torch.Tensor]:
    """PEFT stores the base weight of a targeted embedding beside its adapter (``...base_layer.weight``,
    for resized vocabularies). Such copies are dropped when they equal the model's own weight and
    refused when they differ: lorakit adapters never replace base weights."""
    kept = {}
    for key, tensor in tensors.items():
        if not (key.startswith(KEY_PREFIX) and key.endswith(".base_layer.weight")):
            kept[key] = tensor
            continue
        module_name = key[len(KEY_PREFIX):-len(".base_layer.weight")]
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise FormatError(f"{source}: tensor {key!r} belongs to no module of this model") from None
        own = getattr(module.base_layer if isinstance(module, LoraLayer) else module, "weight", None)
        if not isinstance(own, torch.Tensor):
            raise FormatError(f"{source}: tensor {key!r} belongs to no module of this model with a weight")
        if own.shape != tensor.shape or not torch.allclose(own.detach().cpu().float(), tensor.float()):
            raise FormatError(f"{source}: tensor {key!r} replaces the base weight of {module_name!r} with "
                              "different values (a resized vocabulary?); lorakit adapters cannot carry base weights")
    return kept


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FormatError(f"{source}: missing tensor {missing[0]!r}{more}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise FormatError(f"{source}: tensor {unexpected[0]!r} belongs to no targeted module of this model"
                          + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise FormatError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, but the rank in "
                              f"adapter_config.json and the base model's layer call for {tuple(shape)}")
        if not tensor.is_floating_point():
            raise FormatError(f"{source}: tensor {key!r} has dtype {tensor.dtype}; a floating-point type is needed")
        if not torch.isfinite(tensor).all():
            raise FormatError(f"{source}: tensor {key!r} holds NaN or infinite values")


def _check_base(recorded: str | None, actual: str | None, source: Path) -> None:
    """Refuse an adapter recorded for another base; names compare by their last path part, case-insensitively."""
    if recorded is not None and not isinstance(recorded, str):
        raise FormatError(f"{source}: base_model_name_or_path is {recorded!r}; a string or null is required")
    if not recorded or not actual:
        return
    def stem(name: str) -> str:
        return Path(name.rstrip("/")).name.lower()
    if stem(recorded) != stem(actual):
        raise FormatError(f"{source}: the adapter was trained on {recorded!r}, but the model is {actual!r}; "
                          "pass check_base=False if they really are the same weights")
