"""Saving a LoRA-GA adapter so that it holds on the *original* base model.

Training moved the adapter from ``(A0, B0)`` to ``(A_f, B_f)`` on a base offset by ``-s B0 A0``, so the
trained model is ``W0 + s (B_f A_f - B0 A0)``. That difference is one LoRA adapter of rank ``2r``::

    s (B_f A_f - B0 A0) = s [B_f, -B0] [A_f; A0],   A' = [A_f; A0] (2r, d_in),  B' = [B_f, -B0] (d_out, 2r)

lorakit saves this rank-2r adapter (the official LoRA-GA code's conversion, ``ΔW = B_f A_f - B0 A0``)
rather than the offset base weights: the original base stays the one users, PEFT, vLLM and LoRAX
already have, and the file stays adapter-sized. The scale must stay ``s`` at rank ``2r``, so alpha is
doubled (``s = alpha / r``) or multiplied by ``sqrt(2)`` (rsLoRA, ``s = alpha / sqrt(r)``), per module.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.core.kinds import Conv1DKind
from lorakit.core.state import model_state
from lorakit.errors import AdapterError, StateError
from lorakit.init.lora_ga.offset import LoraGaInit
from lorakit.io.adapters import KEY_PREFIX, base_model_name, task_type, write_adapter_files
from lorakit.io.peft_config import to_peft_dict


def doubled_rank(config: LoraConfig) -> LoraConfig:
    """``config`` at twice the rank (every rank pattern too) with alpha adjusted so every scale is unchanged."""
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    return replace(config, rank=2 * config.rank, alpha=config.alpha * factor,
                   rank_pattern={key: 2 * rank for key, rank in config.rank_pattern.items()},
                   alpha_pattern={key: alpha * factor for key, alpha in config.alpha_pattern.items()})


def lora_ga_export(model: nn.Module, name: str, init: LoraGaInit) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The rank-2r adapter equal to LoRA-GA adapter ``name`` on the original base: its config and its tensors
    under PEFT's keys (fp32, CPU); see the module docstring. ``init`` is what ``init_lora_ga`` returned."""
    record = model_state(model).require(name)
    if set(record.modules) != set(init.modules):
        odd = sorted(set(record.modules) ^ set(init.modules))[0]
        raise AdapterError(f"the LoRA-GA init does not match adapter {name!r}: module {odd!r} is in only one of "
                           "them; pass the value init_lora_ga returned for this adapter")
    config = doubled_rank(record.config)
    tensors = {}
    for module_name in record.modules:
        layer = model.get_submodule(module_name)
        adapter = layer.adapters[name]
        A0, B0, scale = init.A[module_name], init.B[module_name], init.scale[module_name]
        if A0.shape != adapter.A.shape or not math.isclose(scale, adapter.scale, rel_tol=1e-9):
            raise StateError(f"adapter {name!r} on {module_name!r} has A {tuple(adapter.A.shape)} and scale "
                             f"{adapter.scale:g}, but the LoRA-GA init has {tuple(A0.shape)} and {scale:g}")
        if not math.isclose(config.scale_for(module_name), adapter.scale, rel_tol=1e-9):
            raise StateError(f"the rank-2r scale of {module_name!r} is {config.scale_for(module_name):g}, not "
                             f"{adapter.scale:g}; the adapter's scale does not follow its LoraConfig")
        key_a, key_b = layer.kind.peft_keys
        tensors[f"{KEY_PREFIX}{module_name}.{key_a}"] = torch.cat([adapter.A.detach().float().cpu(), A0], dim=0)
        tensors[f"{KEY_PREFIX}{module_name}.{key_b}"] = torch.cat([adapter.B.detach().float().cpu(), -B0], dim=1)
    return config, tensors


def save_lora_ga_adapter(model: nn.Module, path: str | Path, name: str, init: LoraGaInit) -> Path:
    """Write :func:`lora_ga_export`'s rank-2r adapter to directory ``path`` in PEFT format, every file
    atomically, as :func:`lorakit.save_adapter` does (``lorakit.json`` says it is a LoRA-GA export); it loads
    onto the original base with :func:`lorakit.load_adapter` or ``peft.PeftModel.from_pretrained``. Returns
    the directory."""
    config, tensors = lora_ga_export(model, name, init)
    modules = model_state(model).require(name).modules
    fan_in_fan_out = any(isinstance(model.get_submodule(m).kind, Conv1DKind) for m in modules)
    peft_config = to_peft_dict(config, modules, base_model=base_model_name(model), task_type=task_type(model),
                               fan_in_fan_out=fan_in_fan_out)
    directory = Path(path)
    write_adapter_files(directory, tensors, peft_config, origin="lora-ga export (rank 2r, for the original base)")
    return directory
