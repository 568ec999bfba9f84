"""LQ-LoRA (Guo et al., ICLR 2024) and LoftQ (Li et al., ICLR 2024): ``W ~= Q + L1 L2`` with ``Q`` quantized,
the adapter started at ``L1 L2``. See :mod:`lorakit.init.lq_lora.lq_lora_init` for the steps."""

from lorakit.init.lq_lora.allocation import allocate, allocate_in_chunks, minimum_budget
from lorakit.init.lq_lora.config_grid import CONFIG_GRIDS, LQ_LORA_GRID, SMALL_GRID, config_grid
from lorakit.init.lq_lora.decomposition import Decomposition, decompose
from lorakit.init.lq_lora.fisher import estimate_fisher
from lorakit.init.lq_lora.lq_lora_init import LOFTQ_CONFIG, init_loftq, init_lq_lora, quantize_bases, start_from
from lorakit.init.lq_lora.mixed_configs import decomposition_costs, mixed_decompositions

__all__ = ["CONFIG_GRIDS", "Decomposition", "LOFTQ_CONFIG", "LQ_LORA_GRID", "SMALL_GRID", "allocate",
           "allocate_in_chunks", "config_grid", "decompose", "decomposition_costs", "estimate_fisher", "init_loftq",
           "init_lq_lora", "minimum_budget", "mixed_decompositions", "quantize_bases", "start_from"]
