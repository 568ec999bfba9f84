"""MixLoRA (Li et al. 2024, arXiv 2404.15159): LoRA experts in each FFN sharing its frozen weights,
a top-k router per decoder block, plain LoRA on attention, and a load-balancing loss."""

from lorakit.mixtures.mixlora.attach import attach_mixlora, mixlora_layers
from lorakit.mixtures.mixlora.aux_loss import load_balancing_loss
from lorakit.mixtures.mixlora.config import MixLoraConfig
from lorakit.mixtures.mixlora.ffn import MixLoraFFN
from lorakit.mixtures.mixlora.storage import load_mixlora, save_mixlora
from lorakit.mixtures.mixlora.training import MixLoraTraining

__all__ = ["MixLoraConfig", "MixLoraFFN", "MixLoraTraining", "attach_mixlora", "load_balancing_loss", "load_mixlora",
           "mixlora_layers", "save_mixlora"]
