"""MeteoRA on the core layer: one gate per adapted linear, sparse top-k routing of the task adapters.

Every :class:`~lorakit.core.layer.LoraLayer` of Linear or Conv1D kind that holds at least one of the N
adapters gets its own gate ``W_g`` (N x d_in, no bias, fp32). At each forward the core layer asks the
routing's ``select(layer, x)``; the gate of that layer turns its own input into logits ``z = W_g x``,
keeps the ``top_k`` largest ``v`` and weights them ``softmax(v / T)``, so the layer computes
``W0 x + sum_j w_j s_j B_j A_j x`` over the selected adapters only (mixtures.md §3.1, §4.3).

Adapters a layer does not hold are masked out of its gate (logit ``-inf``), so a layer never routes
weight to an adapter it cannot compute; a layer holding fewer than ``top_k`` of them keeps them all.
Embedding and Conv2d layers get no gate: under MeteoRA routing their adapters do not run.

Routing is per token and depends only on that token's input at each layer, so a KV cache is valid and
:meth:`MeteoraModel.generate` simply runs Hugging Face ``generate`` inside the routed context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lorakit.core.activation import routed
from lorakit.core.kinds import LinearKind
from lorakit.core.layer import LoraLayer
from lorakit.core.records import Records, record
from lorakit.core.routing import DenseRouting, SparseRouting
from lorakit.core.state import lora_layers, model_state
from lorakit.errors import AdapterError, ConfigError
from lorakit.mixtures.meteora.config import MeteoraConfig

GATE_LOGITS = "meteora.gate_logits"
"""The record key of each gated layer's ``(key, (..., N) logits)`` pair."""


def gate_key(layer_name: str) -> str:
    """The ``nn.ModuleDict`` key of the gate of the module at ``layer_name`` ('.' is not allowed there)."""
    return layer_name.replace(".", "__")


def gated_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, LoraLayer]]:
    """The Linear/Conv1D lorakit layers of ``model`` holding at least one of ``names``, in module order."""
    return [(path, layer) for path, layer in lora_layers(model)
            if isinstance(layer.kind, LinearKind) and any(name in layer.adapters for name in names)]


def layer_input_size(layer: LoraLayer) -> int:
    """``d_in`` of a Linear or Conv1D lorakit layer (the width its gate reads)."""
    (_, d_in), _ = layer.kind.shapes(layer.base_layer, 1)
    return int(d_in)


def check_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """An :class:`AdapterError` unless ``names`` is a non-empty list of distinct adapters of ``model``."""
    known = model_state(model).adapters
    names = list(names)
    if not names:
        raise AdapterError("MeteoRA needs at least one adapter name")
    if len(set(names)) != len(names):
        raise AdapterError(f"MeteoRA adapter names repeat in {names}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise AdapterError(f"MeteoRA adapters {unknown} are not adapters of the model; loaded: {sorted(known)}")


def top_k_weights(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest logits' indices and weights ``softmax(v / T)``, both ``(..., k)``."""
    values, indices = logits.topk(k, dim=-1)
    return indices, torch.softmax(values / temperature, dim=-1)


class MeteoraModel(nn.Module):
    """A causal LM whose N loaded task adapters are mixed per token by a gate in every adapted linear.

    ``names`` fixes the order: gate output ``n`` belongs to ``names[n]``. The base model stays frozen;
    the adapters too unless ``config.train_adapters``; the gates are trainable.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], config: MeteoraConfig = MeteoraConfig()) -> None:
        super().__init__()
        if not isinstance(config, MeteoraConfig):
            raise ConfigError(f"config must be a MeteoraConfig, not {type(config).__name__}")
        check_adapters(model, names)
        self.model = model
        self.names = tuple(names)
        self.config = config
        layers = gated_layers(model, self.names)
        if not layers:
            raise AdapterError(f"adapters {list(self.names)} adapt no Linear or Conv1D layer of the model")
        self.layer_names = [path for path, _ in layers]
        keys = [gate_key(path) for path in self.layer_names]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"module paths collide as gate keys: {self.layer_names}")
        self.keys = {id(layer): key for key, (_, layer) in zip(keys, layers, strict=True)}
        device = next(model.parameters()).device
        self.gates = nn.ModuleDict()
        for key, (_, layer) in zip(keys, layers, strict=True):
            gate = nn.Linear(layer_input_size(layer), len(self.names), bias=False, device=device, dtype=torch.float32)
            with torch.no_grad():
                gate.weight.uniform_(-config.gate_init_range, config.gate_init_range)
            self.gates[key] = gate
            held = torch.tensor([name in layer.adapters for name in self.names], device=device)
            self.register_buffer(f"_held_{key}", held, persistent=False)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for _, layer in lora_layers(model):
            for name in self.names:
                if name in layer.adapters:
                    layer.adapters[name].requires_grad_(config.train_adapters)

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def n_adapters(self) -> int:
        return len(self.names)

    def held(self, layer_name: str) -> torch.Tensor:
        """Which adapters (bool ``(N,)``) the layer at ``layer_name`` holds."""
        return getattr(self, f"_held_{gate_key(layer_name)}")

    def layer_logits(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The gate logits ``(..., N)`` of ``layer`` for its input ``x`` (fp32; adapters it lacks at -inf),
        or ``None`` for a layer without a gate. Recorded under :data:`GATE_LOGITS` as ``(key, logits)``."""
        key = self.keys.get(id(layer))
        if key is None:
            return None
        gate = self.gates[key]
        logits = nn.functional.linear(x.to(gate.weight.dtype), gate.weight)
        held = getattr(self, f"_held_{key}")
        if not bool(held.all()):
            logits = logits.masked_fill(~held, float("-inf"))
        record(GATE_LOGITS, (key, logits))
        return logits

    def _k(self, layer: LoraLayer) -> int:
        held = getattr(self, f"_held_{self.keys[id(layer)]}")
        return min(self.config.top_k, int(held.sum()))

    def select(self, layer: LoraLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sparse routing's callback: each token's top-k adapters at ``layer`` and their weights."""
        logits = self.layer_logits(layer, x)
        if logits is None:
            return None
        return top_k_weights(logits, self._k(layer), self.config.temperature)

    def dense_weights(self, layer: LoraLayer, x: torch.Tensor) -> torch.Tensor | None:
        """The same weights as :meth:`select`, as a dense ``(..., N)`` tensor, zero outside the top-k."""
        logits = self.layer_logits(layer, x)
        if logits is None:
            return None
        indices, weights = top_k_weights(logits, self._k(layer), self.config.temperature)
        return torch.zeros_like(logits).scatter(-1, indices, weights)

    def routing(self, dense: bool = False) -> SparseRouting | DenseRouting:
        """The core routing MeteoRA computes (``dense``: the reference path over all N adapters)."""
        if dense:
            return DenseRouting(self.names, self.dense_weights, 1.0)
        return SparseRouting(self.names, self.select, 1.0)

    @contextmanager
    def routed(self, dense: bool = False) -> Iterator[nn.Module]:
        """Inside the block, every forward of the wrapped model is routed by the gates (nothing recorded)."""
        with routed(self.model, self.routing(dense)):
            yield self.model

    def forward(self, *args: Any, dense: bool = False, **kwargs: Any) -> Any:
        """The wrapped model's forward (and output) with MeteoRA routing; each gated layer records its gate
        logits (:meth:`gate_logits` reads them from a :func:`~lorakit.core.records.recording`).
        ``dense``: compute every adapter with zero weights outside the top-k (the reference path)."""
        with routed(self.model, self.routing(dense)):
            return self.model(*args, **kwargs)

    def gate_logits(self, records: Records) -> dict[str, torch.Tensor]:
        """Each gated layer's masked gate logits ``(..., N)`` (fp32) among ``records``, keyed by module path,
        in layer order: what :class:`~lorakit.mixtures.meteora.task_loss.MeteoraTaskLoss` supervises."""
        by_key = dict(records.get(GATE_LOGITS, []))
        return {path: by_key[gate_key(path)] for path in self.layer_names if gate_key(path) in by_key}

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face ``generate`` of the wrapped model with MeteoRA routing (KV cache valid: routing is
        per token). Gate logits are not recorded."""
        with routed(self.model, self.routing()):
            return self.model.generate(*args, **kwargs)

    def gate_state(self) -> dict[str, torch.Tensor]:
        """The gate weights keyed by module path (what :func:`save_meteora` writes)."""
        return {path: self.gates[gate_key(path)].weight.detach() for path in self.layer_names}
