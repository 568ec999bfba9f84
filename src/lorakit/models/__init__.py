"""Base models: the default SmolLM2-135M-Instruct (cached GGUF conversion), local dirs, hub ids."""

from lorakit.models.home import lorakit_home
from lorakit.models.load import DEFAULT_MODEL, load_model

__all__ = ["DEFAULT_MODEL", "load_model", "lorakit_home"]
