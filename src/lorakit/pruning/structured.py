"""LoRAM's structured pruning: which key/value head groups and FFN channels each block keeps, and cutting them out.

Zhang et al., "Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models" (ICLR'25,
arXiv 2502.13533) prune LLM-Pruner style: whole key/value heads together with the query heads that share them
(rows of q, k, v, columns of o), and FFN intermediate channels (rows of gate and up, columns of down). The hidden
(residual) width is never cut, so every other weight and every adapter input on the residual stream keeps its
shape. A :class:`PruneMap` records what each pruned block keeps; it is what recovery
(:mod:`lorakit.pruning.recovery`) needs to put a trained adapter back at the full model's indices.

Per pruned block, ``floor(ratio x kv_heads)`` groups go (at least one stays) and ``round(ratio x ffn)`` channels
(at least one stays), those of the lowest importance (ties: the lower index stays).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, FormatError
from lorakit.pruning.decoder_blocks import HeadGeometry, decoder_blocks, head_geometry

_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\."
                     r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class BlockScores:
    """Importance of one block's structures: ``kv_groups`` (kv_heads,) and ``channels`` (ffn,); higher stays."""

    kv_groups: torch.Tensor
    channels: torch.Tensor


@dataclass(frozen=True)
class BlockCut:
    """What one pruned block keeps: key/value head groups and FFN channels, ascending."""

    kv_groups: tuple[int, ...]
    channels: tuple[int, ...]


@dataclass(frozen=True)
class PruneMap:
    """The pruned blocks of a model and what each keeps, with the full model's sizes."""

    geometry: HeadGeometry
    intermediate_size: int
    blocks: Mapping[int, BlockCut]

    def kept(self, module_name: str) -> tuple[str, torch.Tensor] | None:
        """For a pruned projection: which of its sides was cut (``"out"`` rows or ``"in"`` columns) and the full
        model's indices it kept; None for every module pruning left whole."""
        found = _MODULE.search(module_name)
        if found is None or int(found.group(1)) not in self.blocks:
            return None
        cut, projection = self.blocks[int(found.group(1))], found.group(3)
        if projection in ("k_proj", "v_proj"):
            return "out", self.geometry.kv_rows(cut.kv_groups)
        if projection in ("q_proj", "o_proj"):
            return ("out" if projection == "q_proj" else "in"), self.geometry.query_rows(cut.kv_groups)
        return ("in" if projection == "down_proj" else "out"), torch.tensor(cut.channels, dtype=torch.long)

    def full_size(self, module_name: str) -> int:
        """The full model's size of the cut side of ``module_name`` (see :meth:`kept`)."""
        projection = _MODULE.search(module_name).group(3)
        geometry = self.geometry
        if projection in ("k_proj", "v_proj"):
            return geometry.kv_heads * geometry.head_dim
        if projection in ("q_proj", "o_proj"):
            return geometry.heads * geometry.head_dim
        return self.intermediate_size

    def to_json(self) -> dict[str, Any]:
        g = self.geometry
        return {"heads": g.heads, "kv_heads": g.kv_heads, "head_dim": g.head_dim,
                "intermediate_size": self.intermediate_size,
                "blocks": {str(i): {"kv_groups": list(c.kv_groups), "channels": list(c.channels)}
                           for i, c in sorted(self.blocks.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "loram.json") -> PruneMap:
        try:
            geometry = HeadGeometry(heads=int(data["heads"]), kv_heads=int(data["kv_heads"]),
                                    head_dim=int(data["head_dim"]))
            blocks = {int(i): BlockCut(tuple(int(g) for g in c["kv_groups"]), tuple(int(j) for j in c["channels"]))
                      for i, c in data["blocks"].items()}
            return cls(geometry, int(data["intermediate_size"]), blocks)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise FormatError(f"{source}: not a LoRAM prune map ({error!r})") from None

    def summary(self, parameters_before: int, parameters_after: int) -> dict[str, Any]:
        """The map plus how many parameters the pruned model holds (what ``loram.json`` records)."""
        return {**self.to_json(), "parameters_full": parameters_before, "parameters_pruned": parameters_after}


def _top(scores: torch.Tensor, keep: int) -> tuple[int, ...]:
    """Indices of the ``keep`` highest ``scores`` (ties: lower index first), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(order[:keep]))


def pruned_block_indices(model: nn.Module, keep_first: int, keep_last: int) -> list[int]:
    """The blocks LoRAM prunes: all but the first ``keep_first`` and the last ``keep_last``."""
    count = len(decoder_blocks(model))
    return list(range(keep_first, max(keep_first, count - keep_last)))


def plan_pruning(model: nn.Module, scores: Mapping[int, BlockScores], ratio: float) -> PruneMap:
    """The :class:`PruneMap` that removes ``ratio`` of each scored block's structures (module docstring)."""
    if not 0 <= ratio < 1:
        raise ConfigError(f"a pruning ratio of {ratio} is invalid: a fraction in [0, 1) is required")
    geometry = head_geometry(model)
    ffn = model.config.intermediate_size
    drop_groups = min(math.floor(ratio * geometry.kv_heads), geometry.kv_heads - 1)
    drop_channels = min(round(ratio * ffn), ffn - 1)
    blocks = {index: BlockCut(_top(s.kv_groups, geometry.kv_heads - drop_groups), _top(s.channels, ffn - drop_channels))
              for index, s in scores.items()}
    return PruneMap(geometry, ffn, blocks)


def _cut(linear: nn.Linear, side: str, indices: torch.Tensor) -> None:
    """Keep only rows (``out``) or columns (``in``) ``indices`` of ``linear``, in place."""
    with torch.no_grad():
        if side == "out":
            linear.weight = nn.Parameter(linear.weight[indices].clone(), requires_grad=linear.weight.requires_grad)
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias[indices].clone(), requires_grad=linear.bias.requires_grad)
            linear.out_features = len(indices)
        else:
            linear.weight = nn.Parameter(linear.weight[:, indices].clone(), requires_grad=linear.weight.requires_grad)
            linear.in_features = len(indices)


def apply_pruning(model: nn.Module, prune_map: PruneMap) -> nn.Module:
    """Cut ``model``'s pruned blocks down to what ``prune_map`` keeps, in place (before any adapter is attached);
    returns the model."""
    blocks = decoder_blocks(model)
    if head_geometry(model) != prune_map.geometry or model.config.intermediate_size != prune_map.intermediate_size:
        raise ConfigError(f"the prune map was made for heads/kv_heads/head_dim/ffn {prune_map.geometry} / "
                          f"{prune_map.intermediate_size}, not this model's {head_geometry(model)} / "
                          f"{model.config.intermediate_size}")
    for index in prune_map.blocks:
        if index >= len(blocks):
            raise ConfigError(f"the prune map cuts block {index}, but the model has {len(blocks)} blocks")
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                module_name = f"model.layers.{index}.{part}.{name}"
                linear = model.get_submodule(module_name)
                if not isinstance(linear, nn.Linear):
                    raise ConfigError(f"{module_name} is a {type(linear).__name__}; LoRAM prunes a full-precision "
                                      "model before it is quantized or adapted")
                _cut(linear, *prune_map.kept(module_name))
    return model
