"""``adapter_config.json`` as PEFT writes it, to and from :class:`~lorakit.config.LoraConfig`.

The written object has exactly the fields of PEFT 0.21's ``LoraConfig`` (so PEFT, vLLM and LoRAX
read it without warnings); lorakit's own fields map onto PEFT's: ``rank -> r``, ``alpha ->
lora_alpha``, ``dropout -> lora_dropout``, ``targets -> target_modules``, ``exclude -> exclude_modules``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.errors import ConfigError, FormatError

# Fields PEFT writes with these values whenever the feature is unused.
_PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "inference_mode": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
    "peft_type": "LORA", "peft_version": None, "qalora_group_size": 16, "revision": None,
    "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "velora_config": None,
}

# Features lorakit does not implement: a config that uses one is refused rather than loaded wrongly.
_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA", "lora_bias": "LoRA bias terms", "modules_to_save": "modules_to_save",
    "layers_to_transform": "layers_to_transform", "layer_replication": "layer_replication",
    "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "aLoRA", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA",
}


def to_peft_dict(config: LoraConfig, modules: Sequence[str], *, base_model: str | None,
                 task_type: str | None, fan_in_fan_out: bool) -> dict[str, Any]:
    """The ``adapter_config.json`` object for an adapter shaped by ``config`` that wraps ``modules``.

    ``"all-linear"`` is written as the sorted list of wrapped module names, as PEFT itself does.
    """
    if config.targets == ALL_LINEAR:
        targets: str | list[str] = sorted(modules)
    elif isinstance(config.targets, str):
        targets = config.targets
    else:
        targets = sorted(config.targets)
    exclude = config.exclude if isinstance(config.exclude, str) or config.exclude is None else sorted(config.exclude)
    return {
        **_PEFT_DEFAULTS,
        "alpha_pattern": dict(config.alpha_pattern), "base_model_name_or_path": base_model,
        "exclude_modules": exclude, "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "r": config.rank,
        "rank_pattern": dict(config.rank_pattern), "target_modules": targets, "task_type": task_type,
        "use_rslora": config.use_rslora,
    }


def from_peft_dict(obj: dict[str, Any], source: Path) -> LoraConfig:
    """A :class:`LoraConfig` from a PEFT ``adapter_config.json`` object; unsupported features are refused."""
    if obj.get("peft_type") != "LORA":
        raise FormatError(f"{source}: peft_type is {obj.get('peft_type')!r}; lorakit loads 'LORA' adapters")
    for key, feature in _UNSUPPORTED.items():
        if obj.get(key) not in (None, False, [], {}):
            raise FormatError(f"{source}: uses {feature} ({key}={obj[key]!r}), which lorakit does not support")
    if obj.get("bias", "none") != "none":
        raise FormatError(f"{source}: bias={obj['bias']!r} is not supported (only 'none')")
    for required in ("r", "lora_alpha", "target_modules"):
        if required not in obj:
            raise FormatError(f"{source}: the field {required!r} is missing")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if not isinstance(obj.get(pattern) or {}, dict):
            raise FormatError(f"{source}: the field {pattern!r} is {obj[pattern]!r}; a JSON object mapping module "
                              "patterns to values is required")
    if not isinstance(obj.get("use_rslora", False), (bool, type(None))):  # bool("false") is True: never guess
        raise FormatError(f"{source}: the field 'use_rslora' is {obj['use_rslora']!r}; true or false is required")
    # LoraConfig checks alpha for finiteness with float(), which overflows on 10**400, and lets an infinite
    # alpha_pattern through: catch both here, naming the field.
    numbers = {"'lora_alpha'": obj["lora_alpha"], "'lora_dropout'": obj.get("lora_dropout"),
               **{f"'alpha_pattern' entry {k!r}": v for k, v in (obj.get("alpha_pattern") or {}).items()}}
    for field, value in numbers.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= sys.float_info.max:
            raise FormatError(f"{source}: the field {field} is {_short(value)}; a finite number is required")
    try:
        return LoraConfig(
            rank=obj["r"], alpha=obj["lora_alpha"], dropout=obj.get("lora_dropout", 0.0) or 0.0,
            targets=_modules(obj["target_modules"]), exclude=_modules(obj.get("exclude_modules")),
            use_rslora=bool(obj.get("use_rslora")), rank_pattern=obj.get("rank_pattern") or {},
            alpha_pattern=obj.get("alpha_pattern") or {},
        )
    except (ConfigError, TypeError, AttributeError, OverflowError) as err:
        raise FormatError(f"{source}: invalid adapter config: {_peft_field(str(err))}{err}") from None


# lorakit's LoraConfig fields, as adapter_config.json names them.
_PEFT_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "target_modules",
                "exclude": "exclude_modules", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}


def _peft_field(message: str) -> str:
    """``"the field 'r': "`` for a :class:`ConfigError` message about lorakit's ``rank``, so the error
    names the key the user sees in the file; empty when the message names no known field."""
    field = re.match(r"[a-z_]+", message)
    name = field.group(0) if field else ""
    return f"the field {_PEFT_FIELDS[name]!r}: " if name in _PEFT_FIELDS else ""


def _short(value: int | float) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"an integer of {len(text)} digits"


def _modules(value: Any) -> Any:
    """PEFT stores module lists as JSON arrays; lorakit configs hold tuples."""
    return tuple(value) if isinstance(value, list) else value
