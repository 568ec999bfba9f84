"""lorakit: LoRA adapters for PyTorch and Hugging Face models.

    import lorakit
    model, tokenizer = lorakit.load_model("smollm2-135m")
    lorakit.attach(model, lorakit.LoraConfig(rank=16, alpha=32))
    ...                                   # train: lorakit.trainable_parameters(model)
    lorakit.save_adapter(model, "out/")   # PEFT format: loads in peft, vLLM, LoRAX
    loaded = lorakit.load("out/")         # any directory lorakit writes: loaded.model, .tokenizer, .adapters
"""

from lorakit.combine import combine_adapters
from lorakit.config import ALL_LINEAR, LoraConfig, TrainConfig
from lorakit.core.activation import active, active_weights, disabled, mixed_batch, set_active
from lorakit.core.inject import TargetPlan, plan
from lorakit.core.lifecycle import adapter_names, attach, delete_adapter, trainable_parameters
from lorakit.core.merge import merge, merge_and_unload, merged_adapters, unmerge
from lorakit.core.stack_cache import frozen_factors
from lorakit.errors import (
    AdapterError,
    ConfigError,
    DataError,
    FormatError,
    LorakitError,
    ModelError,
    StateError,
    TargetError,
    TrainingError,
)
from lorakit.io.adapters import load_adapter, save_adapter
from lorakit.io.directory_kinds import Loaded
from lorakit.io.loader import load
from lorakit.mixtures import meteora, mixlora, xlora  # noqa: F401  (their directory kinds register on import)
from lorakit.models import DEFAULT_MODEL, load_model
from lorakit.quant import l4q, nf_model_dir, quantized_adapter  # noqa: F401  (directory kinds)

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR", "DEFAULT_MODEL", "AdapterError", "ConfigError", "DataError", "FormatError", "LoraConfig",
    "Loaded", "LorakitError", "ModelError", "StateError", "TargetError", "TargetPlan", "TrainConfig",
    "TrainingError", "active", "active_weights", "adapter_names", "attach", "combine_adapters", "delete_adapter",
    "disabled", "frozen_factors", "load", "load_adapter", "load_model", "merge", "merge_and_unload", "merged_adapters",
    "mixed_batch", "plan", "save_adapter", "set_active", "trainable_parameters", "unmerge",
]
