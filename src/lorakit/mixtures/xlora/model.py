"""X-LoRA on the core layer: a scaling pass, the classifier, and the real pass with dense routing.

``forward`` runs (1) the base model with every expert at ``scaling_pass_value`` (0: the base model
itself) under ``no_grad``, (2) the classifier on that pass's last hidden state, giving scalings
``sigma (B, S, L, N)``, and (3) the model again with adapted module ``l`` computing
``W0 x + g sum_n sigma[..., l, n] s_n B_n A_n x`` (only each token's top-k experts with ``top_k``).
Each pass keeps its own KV cache, so a generated token costs two single-token steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.core.activation import disabled, routed
from lorakit.core.layer import LoraLayer
from lorakit.core.routing import DenseRouting, SparseRouting
from lorakit.core.state import lora_layers, model_state
from lorakit.errors import AdapterError
from lorakit.mixtures.xlora.classifier import XLoraClassifier, keep_top_k
from lorakit.mixtures.xlora.config import XLoraConfig


@dataclass
class XLoraOutput:
    """What an X-LoRA forward returns: the real pass's logits, both passes' caches, the scalings."""

    logits: torch.Tensor
    scalings: torch.Tensor
    past_key_values: tuple[Any, Any] | None = None


class XLoraModel(nn.Module):
    """A causal LM whose loaded LoRA adapters (the experts) are mixed per token by a classifier.

    The experts must already be loaded into ``base`` (``lorakit.load_adapter``) under ``experts``'
    names; the base and the experts stay frozen unless ``config.trainable_experts``.
    """

    def __init__(self, base: nn.Module, experts: Sequence[str], config: XLoraConfig = XLoraConfig()) -> None:
        super().__init__()
        known = model_state(base).adapters
        unknown = [name for name in experts if name not in known]
        if unknown or not experts:
            raise AdapterError(f"X-LoRA experts {unknown or list(experts)} are not adapters of the model; "
                               f"loaded adapters: {sorted(known)}")
        self.base = base
        self.experts = tuple(experts)
        self.config = config
        self.layer_names = [n for n, layer in lora_layers(base) if any(e in layer.adapters for e in experts)]
        self.slots = {id(base.get_submodule(n)): slot for slot, n in enumerate(self.layer_names)}
        hidden = base.config.hidden_size
        self.classifier = XLoraClassifier(hidden, len(self.experts), len(self.layer_names), config)
        self.classifier.to(next(base.parameters()).device)
        for name in self.experts:
            for _, layer in lora_layers(base):
                if name in layer.adapters:
                    layer.adapters[name].requires_grad_(config.trainable_experts)
        self.logged_scalings: list[torch.Tensor] | None = None
        """Set to a list to collect the scalings of every forward (detached, on the CPU)."""
        self.train(base.training)  # on an eval-mode base the classifier's dropout stays off

    @property
    def generation_config(self):
        return self.base.generation_config

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    def routing_for(self, scalings: torch.Tensor) -> DenseRouting | SparseRouting:
        """The core layer's routing for scalings ``(B, S, L, N)``: dense, or sparse with ``top_k``."""
        g = self.config.global_scaling_weight
        if self.config.top_k is None:
            return DenseRouting(self.experts, lambda layer, _x: scalings[:, :, self.slots[id(layer)], :], g)
        indices, values = keep_top_k(scalings, min(self.config.top_k, len(self.experts)),
                                     self.config.enable_softmax_topk)
        return SparseRouting(self.experts, lambda layer, _x: (indices[:, :, self.slots[id(layer)], :],
                                                                values[:, :, self.slots[id(layer)], :]), g)

    def scaling_pass(self, model_inputs: dict[str, Any], cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Pass 1 (no gradient): the last hidden state with every expert scaled by ``scaling_pass_value``.

        At 0 this is the base model itself. Otherwise the constant scalings go through the same top-k,
        top-k softmax and global weight as real scalings, exactly as PEFT does, so that classifiers
        trained there behave the same here (a constant's top-k keeps experts 0..k-1)."""
        value = self.config.pass_value(len(self.experts))
        with torch.no_grad():
            if value == 0.0:
                with disabled(self.base):
                    return self._last_hidden(model_inputs, cache)
            ids = model_inputs["input_ids"]
            constant = torch.full((*ids.shape, self.n_layers, len(self.experts)), value, device=ids.device)
            with routed(self.base, self.routing_for(constant)):
                return self._last_hidden(model_inputs, cache)

    def _last_hidden(self, model_inputs: dict[str, Any], cache: Any) -> tuple[torch.Tensor, Any]:
        """The last hidden state (what the LM head reads) and the cache; skips the LM head when the model
        exposes its decoder (``hidden_states[-1]`` of the full model is the decoder's output)."""
        decoder = self.base.get_decoder() if hasattr(self.base, "get_decoder") else None
        if decoder is not None:
            out = decoder(**model_inputs, past_key_values=cache)
            return out.last_hidden_state, getattr(out, "past_key_values", None)
        out = self.base(**model_inputs, past_key_values=cache, output_hidden_states=True)
        return out.hidden_states[-1], getattr(out, "past_key_values", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: tuple[Any, Any] | None = None,
                use_cache: bool = False, scalings: torch.Tensor | None = None, **kwargs: Any) -> XLoraOutput:
        """Both passes; ``past_key_values`` is the pair of caches a previous call returned. Given
        ``scalings`` (``(B, S, L, N)``, e.g. reused from the prompt), the scaling pass is skipped."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": use_cache, **kwargs}
        scaling_cache, real_cache = past_key_values if past_key_values is not None else (None, None)
        if scalings is None:
            hidden, scaling_cache = self.scaling_pass(inputs, scaling_cache)
            scalings = self.classifier(hidden.to(next(self.classifier.parameters()).dtype))
        if self.logged_scalings is not None:
            self.logged_scalings.append(scalings.detach().cpu())
        with routed(self.base, self.routing_for(scalings)):
            out = self.base(**inputs, past_key_values=real_cache)
        caches = (scaling_cache, out.past_key_values) if use_cache else None
        return XLoraOutput(out.logits, scalings, caches)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any):
        """Generate with a KV cache for each pass (see :func:`lorakit.mixtures.xlora.generation.generate`)."""
        from lorakit.mixtures.xlora.generation import generate
        return generate(self, input_ids, attention_mask, **options)


def expert_layers(model: XLoraModel) -> list[tuple[str, LoraLayer]]:
    """The adapted modules X-LoRA routes, in slot order (the L axis of the scalings)."""
    return [(name, model.base.get_submodule(name)) for name in model.layer_names]
