"""A model's skeleton: its modules built from a config with every parameter on the ``meta`` device (no memory,
no initialisation), buffers real, so that weights can be streamed in one tensor at a time.

Buffers stay real because models compute some of them in their constructors and never store them (rotary
position frequencies: non-persistent buffers, absent from every checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lorakit.errors import ModelError


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers is moved to the meta device (its buffers are not)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def causal_lm_skeleton(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal language model ``config`` describes, its parameters on the meta device, for :func:`set_parameter`."""
    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of ``model``'s parameter ``name`` (same shape), keeping whether it trains."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = owner._parameters.get(leaf)
    if current is None:
        raise ModelError(f"the checkpoint holds {name!r}, which is no parameter of {type(model).__name__}")
    if tuple(current.shape) != tuple(value.shape):
        raise ModelError(f"the checkpoint's {name!r} is {tuple(value.shape)}, but the model's parameter there is "
                         f"{tuple(current.shape)}: the weights do not belong to this config")
    owner._parameters[leaf] = nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad)


def check_filled(model: PreTrainedModel) -> None:
    """Tie the model's shared weights, then refuse any parameter still on the meta device, by name."""
    model.tie_weights()
    empty = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if empty:
        raise ModelError(f"the checkpoint lacks {len(empty)} parameter(s) of {type(model).__name__}, e.g. "
                         f"{empty[:3]}: it is incomplete or belongs to another model")
