"""How important each prunable structure of a block is, for LoRAM's structured pruning.

A structure is a key/value head group (its q, k, v rows and o columns) or an FFN channel (its gate and up rows
and down column). Three rankings, the ones LoRAM compares (Zhang et al., ICLR'25, Sec. 4):

- ``gradient``: LLM-Pruner's first-order Taylor importance, ``I = sum_{w in structure} |w * g_w|`` with ``g`` the
  loss gradient summed over the first training batches (Ma et al., NeurIPS'23);
- ``magnitude``: the structure's Frobenius norm ``sqrt(sum w^2)``;
- ``random``: a seeded permutation (LoRAM's "Rand" baseline).

Under ``torch.distributed`` each rank passes its share of the batches and the gradient sums are added over the
ranks (float64) before scoring, so every rank cuts the same structures.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorakit.errors import DataError
from lorakit.init.lora_ga.gradients import backward_each, collecting_gradients
from lorakit.parallel.process_group import sum_across_ranks
from lorakit.pruning.decoder_blocks import FFN_PROJECTIONS, HeadGeometry, head_geometry
from lorakit.pruning.structured import BlockScores

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _projections(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    block = model.model.layers[index]
    return {**{name: getattr(block.self_attn, name).weight for name in ATTENTION},
            **{name: getattr(block.mlp, name).weight for name in FFN_PROJECTIONS}}


def _structure_sums(values: dict[str, torch.Tensor], geometry: HeadGeometry) -> BlockScores:
    """Per structure, the sum of ``values`` (elementwise, shaped like each projection's weight) over its weights."""
    q_rows = values["q_proj"].sum(dim=1).view(geometry.kv_heads, -1).sum(dim=1)  # (kv_heads,)
    o_cols = values["o_proj"].sum(dim=0).view(geometry.kv_heads, -1).sum(dim=1)
    kv = sum(values[name].sum(dim=1).view(geometry.kv_heads, -1).sum(dim=1) for name in ("k_proj", "v_proj"))
    channels = values["gate_proj"].sum(dim=1) + values["up_proj"].sum(dim=1) + values["down_proj"].sum(dim=0)
    return BlockScores(kv_groups=q_rows + o_cols + kv, channels=channels)


def magnitude_scores(model: nn.Module, blocks: list[int]) -> dict[int, BlockScores]:
    """``sqrt(sum w^2)`` of every structure of ``blocks``."""
    geometry = head_geometry(model)
    scores = {}
    for index in blocks:
        summed = _structure_sums({n: w.detach().double() ** 2 for n, w in _projections(model, index).items()}, geometry)
        scores[index] = BlockScores(summed.kv_groups.sqrt(), summed.channels.sqrt())
    return scores


def random_scores(model: nn.Module, blocks: list[int], seed: int) -> dict[int, BlockScores]:
    """A seeded random ranking of every structure of ``blocks``."""
    geometry = head_geometry(model)
    generator = torch.Generator().manual_seed(seed)
    return {index: BlockScores(torch.rand(geometry.kv_heads, generator=generator, dtype=torch.float64),
                               torch.rand(model.config.intermediate_size, generator=generator, dtype=torch.float64))
            for index in blocks}


def gradient_scores(model: nn.Module, blocks: list[int], batches: Iterable[dict], *,
                    progress: bool = False) -> dict[int, BlockScores]:
    """First-order Taylor importance ``sum |w * g|`` of every structure of ``blocks``, ``g`` the summed gradient of
    the batches' mean supervised losses (added over the ranks)."""
    geometry = head_geometry(model)
    weights = {(index, name): w for index in blocks for name, w in _projections(model, index).items()}
    sums = {key: torch.zeros(w.shape, dtype=torch.float64) for key, w in weights.items()}
    by_id = {id(w): key for key, w in weights.items()}

    def collect(weight: torch.Tensor) -> None:
        sums[by_id[id(weight)]] += weight.grad.detach().to("cpu", torch.float64)
        weight.grad = None

    with collecting_gradients(model, list(weights.values()), collect):
        count = backward_each(model, batches, progress, "loram importance", "batch")
    if sum_across_ranks(torch.tensor(float(count))).item() == 0:
        raise DataError("LoRAM's gradient importance found no supervised token in its batches; use --loram-importance "
                        "magnitude or data with completions")
    return {index: _structure_sums({name: (weights[index, name].detach().to("cpu", torch.float64)
                                           * sum_across_ranks(sums[index, name])).abs()
                                    for name in (*ATTENTION, *FFN_PROJECTIONS)}, geometry)
            for index in blocks}
