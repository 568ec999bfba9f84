"""Saving and loading MeteoRA gates. The adapters are referenced by name, not stored: load them first.

A directory holds ``meteora_config.json`` (the config, the adapter names as a list in gate-output
order, the gated module paths) and ``gates.safetensors`` (one ``N x d_in`` fp32 tensor per module
path), both written atomically together. Loading checks everything before it touches the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import ConfigError, FormatError
from lorakit.io.files import json_writer, load_json, load_tensors, tensor_writer, write_all_atomically
from lorakit.mixtures.meteora.config import MeteoraConfig
from lorakit.mixtures.meteora.model import MeteoraModel, check_adapters, gate_key, gated_layers, layer_input_size

CONFIG_FILE = "meteora_config.json"
GATES_FILE = "gates.safetensors"
FORMAT_VERSION = 1


def save_meteora(model: MeteoraModel, path: str | Path) -> Path:
    """Write ``model``'s config, adapter names and gates to the directory ``path`` (not the adapters)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    gates = {name: weight.float() for name, weight in model.gate_state().items()}
    config = {"format_version": FORMAT_VERSION, "meteora": dataclasses.asdict(model.config),
              "adapters": list(model.names), "layer_names": list(model.layer_names)}
    write_all_atomically({directory / GATES_FILE: tensor_writer(gates), directory / CONFIG_FILE: json_writer(config)})
    return directory


def saved_adapters(path: str | Path) -> list[str]:
    """The adapter names (in gate order) of the MeteoRA model saved at ``path``: load these first."""
    return _read_config(Path(path))[1]


def _read_config(directory: Path) -> tuple[MeteoraConfig, list[str], list[str]]:
    file = directory / CONFIG_FILE
    saved = load_json(file)
    if saved.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{file}: format_version {saved.get('format_version')!r} is not {FORMAT_VERSION}")
    try:
        config = MeteoraConfig(**saved["meteora"])
    except (KeyError, TypeError, ConfigError) as err:
        raise FormatError(f"{file}: invalid MeteoRA config ({err})") from None
    names, layers = saved.get("adapters"), saved.get("layer_names")
    for field, value in (("adapters", names), ("layer_names", layers)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise FormatError(f"{file}: {field!r} must be a non-empty list of strings, not {value!r}")
    return config, names, layers


def load_meteora(model: nn.Module, path: str | Path) -> MeteoraModel:
    """The MeteoRA model saved at ``path`` on ``model``, which must already hold the saved adapters.

    A :class:`FormatError` (bad files, other gated modules, gate shapes, non-finite weights) or an
    :class:`~lorakit.errors.AdapterError` (missing adapters) leaves ``model`` unchanged."""
    directory = Path(path)
    config, names, layer_names = _read_config(directory)
    check_adapters(model, names)
    layers = gated_layers(model, names)
    if [p for p, _ in layers] != layer_names:
        raise FormatError(f"{directory / CONFIG_FILE}: the adapters {names} gate other modules of this model "
                          f"than the saved ones ({len(layers)} vs {len(layer_names)})")
    tensors = load_tensors(directory / GATES_FILE)
    if set(tensors) != set(layer_names):
        missing, extra = sorted(set(layer_names) - set(tensors)), sorted(set(tensors) - set(layer_names))
        raise FormatError(f"{directory / GATES_FILE}: gates missing for {missing}, unexpected {extra}")
    for layer_name, layer in layers:
        gate, expected = tensors[layer_name], (len(names), layer_input_size(layer))
        if tuple(gate.shape) != expected:
            raise FormatError(f"{directory / GATES_FILE}: gate {layer_name!r} has shape {tuple(gate.shape)}, "
                              f"expected {expected} ({len(names)} adapters x input width)")
        if not gate.is_floating_point() or not bool(torch.isfinite(gate).all()):
            raise FormatError(f"{directory / GATES_FILE}: gate {layer_name!r} is not a finite float tensor")
    meteora = MeteoraModel(model, names, config)
    with torch.no_grad():
        for layer_name in layer_names:
            weight = meteora.gates[gate_key(layer_name)].weight
            weight.copy_(tensors[layer_name].to(weight.dtype))
    return meteora
