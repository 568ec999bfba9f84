"""The parts of a Llama-style decoder that structured pruning cuts: per block the attention projections
(q, k, v, o), the gated FFN (gate, up, down) and the two RMSNorms, plus the head geometry.

Llama, Mistral, Qwen2 and SmolLM2 share this layout (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
``.mlp.{gate,up,down}_proj``, ``.input_layernorm``, ``.post_attention_layernorm``); any other model is refused
with the names that were missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import ModelError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class HeadGeometry:
    """Attention heads of one model: ``heads`` query heads of ``head_dim``, ``kv_heads`` key/value heads, each
    shared by ``group`` = heads / kv_heads query heads (grouped-query attention)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def kv_rows(self, groups: Sequence[int]) -> torch.Tensor:
        """Rows of k_proj/v_proj (and columns of nothing) that key/value heads ``groups`` own, ascending."""
        return torch.cat([torch.arange(g * self.head_dim, (g + 1) * self.head_dim) for g in sorted(groups)]
                         or [torch.zeros(0, dtype=torch.long)])

    def query_rows(self, groups: Sequence[int]) -> torch.Tensor:
        """Rows of q_proj (= columns of o_proj) of the query heads that share key/value heads ``groups``."""
        heads = [h for g in sorted(groups) for h in range(g * self.group, (g + 1) * self.group)]
        return torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads]
                         or [torch.zeros(0, dtype=torch.long)])


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-style causal LM, checked to hold every projection pruning cuts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"{type(model).__name__} has no model.layers: structured pruning supports Llama-style "
                         "decoders (Llama, Mistral, Qwen2, SmolLM2)")
    for index, block in enumerate(layers):
        missing = [f"self_attn.{name}" for name in ATTENTION_PROJECTIONS
                   if not hasattr(getattr(block, "self_attn", None), name)]
        missing += [f"mlp.{name}" for name in FFN_PROJECTIONS if not hasattr(getattr(block, "mlp", None), name)]
        if missing:
            raise ModelError(f"decoder block {index} of {type(model).__name__} lacks {', '.join(missing)}: "
                             "structured pruning supports Llama-style decoders (Llama, Mistral, Qwen2, SmolLM2)")
    return layers


def head_geometry(model: nn.Module) -> HeadGeometry:
    """The head counts and size of ``model``'s config (``head_dim`` defaults to hidden / heads)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadGeometry(heads=heads, kv_heads=kv_heads, head_dim=head_dim)
