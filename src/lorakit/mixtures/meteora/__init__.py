"""MeteoRA (Xu, Lai, Huang 2024): per-linear gates route each token to its top-k task LoRA adapters."""

from lorakit.mixtures.meteora.config import MeteoraConfig
from lorakit.mixtures.meteora.model import MeteoraModel
from lorakit.mixtures.meteora.storage import load_meteora, save_meteora, saved_adapters
from lorakit.mixtures.meteora.task_loss import MeteoraTaskLoss, gate_task_loss

__all__ = ["MeteoraConfig", "MeteoraModel", "MeteoraTaskLoss", "gate_task_loss", "load_meteora", "save_meteora",
           "saved_adapters"]
