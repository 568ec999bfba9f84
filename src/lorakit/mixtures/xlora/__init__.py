"""X-LoRA (Buehler & Buehler 2024): a classifier mixes pre-trained LoRA experts per token and layer."""

from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.model import XLoraModel, XLoraOutput
from lorakit.mixtures.xlora.storage import load_xlora, save_xlora

__all__ = ["XLoraConfig", "XLoraModel", "XLoraOutput", "load_xlora", "save_xlora"]
