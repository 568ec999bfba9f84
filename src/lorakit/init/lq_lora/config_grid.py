"""The candidate quantizer configurations of LQ-LoRA's mixed-configuration step (Guo et al., ICLR 2024, Sec. 3.2).

LQ-LoRA's grid is every ``(b, b0, B0, B1, b1)`` with ``b, b0`` in {2, 3, 4, 8}, ``B0`` in {16, 32, 64},
``B1`` in {16, 64, 256} and ``b1`` in {fp16, bf16}: 288 configurations, each costing
``b + b0 / B0 + b1 / (B0 B1)`` bits per parameter. Every one is a full decomposition per matrix, so
lorakit's default is a small grid of 8 that spans the same budgets (2.13 to 8.5 bits).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from lorakit.quant.nf_config import NFConfig


def config_grid(*, bits: Sequence[int], block_sizes: Sequence[int], scale_bits: Sequence[int | None],
                scale_block_sizes: Sequence[int], scale_dtypes: Sequence[str]) -> tuple[NFConfig, ...]:
    """Every combination of the given values, once each (``scale_bits=None`` ignores the scale block
    sizes and dtypes, so it adds one config per ``(b, B0)``)."""
    configs: dict[NFConfig, None] = {}
    for b, B0, b0, B1, b1 in itertools.product(bits, block_sizes, scale_bits, scale_block_sizes, scale_dtypes):
        second_level = {} if b0 is None else {"scale_block_size": B1, "scale_dtype": b1}
        configs[NFConfig(bits=b, block_size=B0, scale_bits=b0, **second_level)] = None
    return tuple(configs)


LQ_LORA_GRID = config_grid(bits=(2, 3, 4, 8), block_sizes=(16, 32, 64), scale_bits=(2, 3, 4, 8),
                           scale_block_sizes=(16, 64, 256), scale_dtypes=("fp16", "bf16"))
"""LQ-LoRA's 288 configurations."""
SMALL_GRID = config_grid(bits=(2, 3, 4, 8), block_sizes=(16, 64), scale_bits=(8,), scale_block_sizes=(256,),
                         scale_dtypes=("fp16",))
"""8 configurations: NF2, NF3, NF4 and NF8 in blocks of 16 or 64, their scales in NF8 (QLoRA's double quantization)."""
CONFIG_GRIDS: Mapping[str, tuple[NFConfig, ...]] = {"small": SMALL_GRID, "lq-lora": LQ_LORA_GRID}
"""The grids by the names ``QuantizedInitConfig.grid`` takes."""
