"""Saving and loading MeteoRA gates. The adapters are referenced, not stored.

A directory holds ``meteora_config.json`` (the config, the adapter names as a list in gate-output
order, the gated module paths, the base model and, when the saver gave them, where each adapter lives)
and ``gates.safetensors`` (one ``N x d_in`` fp32 tensor per module path), written atomically together
with ``lorakit.json`` (kind ``meteora``). Adapter paths are relative to the directory when the adapters
sit inside or beside it (a moved or copied run still loads), absolute otherwise. Without recorded paths
the model must hold the adapters already. lorakit 0.1 kept the paths (absolute) and the base in the
``meteora_run.json`` of ``lorakit meteora train`` beside the gates; such directories still load.
Loading checks everything before it touches the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lorakit.core.lifecycle import adapter_names
from lorakit.errors import ConfigError, FormatError
from lorakit.io.adapters import base_model_name, load_adapter
from lorakit.io.directory_kinds import DirectoryKind, Loaded, has_field, register_kind
from lorakit.io.files import json_writer, load_json, load_tensors, tensor_writer, write_all_atomically
from lorakit.io.metadata import METADATA_FILE, metadata_writer
from lorakit.io.paths import portable_path, recorded_directory
from lorakit.io.recorded_base import base_for
from lorakit.mixtures.meteora.config import MeteoraConfig
from lorakit.mixtures.meteora.model import MeteoraModel, check_adapters, gate_key, gated_layers, layer_input_size

METEORA_KIND = "meteora"
CONFIG_FILE = "meteora_config.json"
GATES_FILE = "gates.safetensors"
RELEASE_RUN_FILE = "meteora_run.json"  # where lorakit 0.1 recorded the adapters' paths and the base
FORMAT_VERSION = 1


def save_meteora(model: MeteoraModel, path: str | Path, adapter_paths: Mapping[str, str | Path] | None = None) -> Path:
    """Write ``model``'s config, adapter names and gates to the directory ``path`` (not the adapters), with
    where each adapter lives when ``adapter_paths`` (name -> directory) is given, so it loads on its own."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    gates = {name: weight.float() for name, weight in model.gate_state().items()}
    config = {"format_version": FORMAT_VERSION, "meteora": dataclasses.asdict(model.config),
              "adapters": list(model.names), "layer_names": list(model.layer_names),
              "base_model_name_or_path": base_model_name(model.model)}
    if adapter_paths is not None:
        config["adapter_paths"] = {name: portable_path(adapter_paths[name], directory) for name in model.names}
    write_all_atomically({directory / GATES_FILE: tensor_writer(gates), directory / CONFIG_FILE: json_writer(config),
                          directory / METADATA_FILE: metadata_writer(METEORA_KIND)})
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


def _references(directory: Path) -> tuple[object, dict[str, str] | None, Path]:
    """The recorded base, the adapters' recorded paths (None: not recorded) and the file recording them:
    ``meteora_config.json``, or for a lorakit 0.1 directory the ``meteora_run.json`` beside it."""
    saved, source = load_json(directory / CONFIG_FILE), directory / CONFIG_FILE
    if "adapter_paths" not in saved and (directory / RELEASE_RUN_FILE).is_file():
        run, source = load_json(directory / RELEASE_RUN_FILE), directory / RELEASE_RUN_FILE
        pairs = run.get("adapters")
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise FormatError(f"{source}: 'adapters' must be a list of [name, path] pairs, not {pairs!r}")
        return run.get("base"), dict(pairs), source
    paths = saved.get("adapter_paths")
    if paths is not None and not isinstance(paths, dict):
        raise FormatError(f"{source}: 'adapter_paths' must map adapter names to directories, not {paths!r}")
    return saved.get("base_model_name_or_path"), paths, source


def _load(directory: Path, model: nn.Module | None) -> Loaded:
    _, names, _ = _read_config(directory)
    recorded_base, paths, source = _references(directory)
    base, tokenizer = base_for(model, recorded_base, source)
    held = set(adapter_names(base))
    if paths is None and not held.issuperset(names):
        missing = [name for name in names if name not in held]
        raise FormatError(f"{source}: records no adapter paths (saved without adapter_paths), and the model holds "
                          f"no adapter {missing[0]!r}; load the adapters {names} into the model first")
    if paths is not None:
        missing = [name for name in names if not isinstance(paths.get(name), str)]
        if missing:
            raise FormatError(f"{source}: records no path for adapter {missing[0]!r}; it records {sorted(paths)}")
        found = {name: recorded_directory(paths[name], directory, what=f"adapter {name!r}", source=source)
                 for name in names}
        for name in names:
            load_adapter(base, found[name], name, activate=False)
    meteora = load_meteora(base, directory).eval()
    return Loaded(kind=METEORA_KIND, path=directory, model=meteora, base=base, tokenizer=tokenizer,
                  adapters=meteora.names)


def _describe(directory: Path) -> dict:
    config, names, layers = _read_config(directory)
    recorded_base, paths, _ = _references(directory)
    return {"path": str(directory), "base_model": recorded_base, "meteora": dataclasses.asdict(config),
            "adapters": {name: (paths or {}).get(name) for name in names}, "modules": len(layers)}


register_kind(DirectoryKind(
    name=METEORA_KIND, holds="a MeteoRA model (a gate per adapted linear over task adapters)", load=_load,
    describe=_describe, recognise=has_field(CONFIG_FILE, "meteora"), recognised_by=f"{CONFIG_FILE} (lorakit 0.1)",
    routed="its gates route each token to its top-k task adapters"))
