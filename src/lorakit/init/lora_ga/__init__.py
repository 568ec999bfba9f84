"""LoRA-GA (Wang, Yu, Li 2024): gradient estimate -> SVD init with a base offset -> rank-2r export.

See :mod:`lorakit.init.lora_ga.lora_ga_init` for the two explicit steps.
"""

from lorakit.init.lora_ga.export import lora_ga_export, save_lora_ga_adapter
from lorakit.init.lora_ga.gradients import GradientEstimate, estimate_gradients
from lorakit.init.lora_ga.lora_ga_init import init_lora_ga, start_from
from lorakit.init.lora_ga.offset import LoraGaInit, offset_base, restore_base

__all__ = ["GradientEstimate", "LoraGaInit", "estimate_gradients", "init_lora_ga", "lora_ga_export",
           "offset_base", "restore_base", "save_lora_ga_adapter", "start_from"]
