"""What lorakit remembers about a model: its adapters, their configs, and the shared routing.

The state lives on the model as the plain attribute ``lorakit_state`` (not a module, so it is not in
``state_dict``). A forward pre-hook on the model turns the call keyword ``adapter_per_row=[...]`` into
per-row routing for that call; a forward hook that runs even when the forward raises restores it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

from torch import nn

from lorakit.config import LoraConfig
from lorakit.core.layer import LoraLayer
from lorakit.core.routing import PerRowRouting, RoutingState
from lorakit.errors import AdapterError

STATE_ATTR = "lorakit_state"


@dataclass
class AdapterRecord:
    """One adapter of a model: its config and the modules it wraps."""

    config: LoraConfig
    modules: tuple[str, ...]


class ModelState:
    """The adapters of one model and the routing its layers share."""

    def __init__(self) -> None:
        self.adapters: dict[str, AdapterRecord] = {}
        self.routing = RoutingState()
        self.frozen: list[nn.Parameter] = []
        """Base parameters lorakit froze; unfrozen again when the last adapter goes."""
        self._calls: list[ExitStack] = []
        self._hooks: list = []

    def require(self, name: str) -> AdapterRecord:
        """The record of adapter ``name``; an :class:`AdapterError` lists the known names."""
        if name not in self.adapters:
            raise AdapterError(f"unknown adapter {name!r}; known adapters: {sorted(self.adapters) or '(none)'}")
        return self.adapters[name]

    def install_hooks(self, model: nn.Module) -> None:
        """Let ``model(..., adapter_per_row=[...])`` route each row of the batch to its own adapter."""
        self._hooks = [model.register_forward_pre_hook(self._enter_call, with_kwargs=True),
                       model.register_forward_hook(self._exit_call, always_call=True)]

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _enter_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        names = kwargs.pop("adapter_per_row", None)
        stack = ExitStack()
        if names is not None:
            stack.enter_context(self.routing.override(PerRowRouting(tuple(names)), list(self.adapters)))
        self._calls.append(stack)
        return args, kwargs

    def _exit_call(self, module: nn.Module, args: tuple, output):
        if self._calls:
            self._calls.pop().close()
        return output


def model_state(model: nn.Module) -> ModelState:
    """The lorakit state of ``model``; an :class:`AdapterError` if it holds no adapters."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise AdapterError(f"{type(model).__name__} holds no lorakit adapters; attach or load one first")
    return state


def ensure_state(model: nn.Module) -> ModelState:
    """The lorakit state of ``model``, created (with its hooks) on first use."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = ModelState()
        state.install_hooks(model)
        setattr(model, STATE_ATTR, state)
    return state


def drop_state(model: nn.Module) -> None:
    """Remove every trace of lorakit's state from ``model``."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        state.remove_hooks()
        for parameter in state.frozen:
            parameter.requires_grad_(True)
        delattr(model, STATE_ATTR)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every :class:`LoraLayer` of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module
