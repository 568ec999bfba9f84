"""Which initialisations, methods, optimizers and regularizers combine, and why some do not.

:data:`_REFUSED` holds each refused pair with its reason (docs/METHODS.md shows the same table); full
fine-tuning refuses every LoRA-factor method, and ALLoRA refuses dropout. Everything else combines:
EVA with DyLoRA (EVA's components are ordered by explained variance, so they nest), any init with
LoRA-Pro or ALLoRA, BA-LoRA with anything but L4Q and PAT (runs whose base weights move, LoRA-GA and full
fine-tuning, compare with a frozen copy of the model as the run starts). ALLoRA and CoDyRA are scaling-free:
:func:`scale_free` sets ``alpha`` so that ``s = 1``. ``--fsdp`` takes AdamW and plain LoRA (any init that does not
quantize), which step shard by shard, on whole sequences (not ``--chunk-size``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from lorakit.config import QUANTIZING_INITS, LoraConfig, TrainConfig
from lorakit.errors import ConfigError

_REFUSED = {
    ("init", "lora-ga", "method", "dylora"): "LoRA-GA offsets the base by the full-rank s B0 A0, which a "
                                             "truncated DyLoRA adapter would no longer cancel",
    ("init", "lora-ga", "method", "codyra"): "CoDyRA's random gates would rescale LoRA-GA's B0 A0, which the "
                                             "base offset must cancel",
    ("optimizer", "lora-pro", "method", "dylora"): "LoRA-Pro matches the full gradient with the whole (A, B) "
                                                   "pair; DyLoRA trains a different truncation each step",
    ("optimizer", "lora-pro", "method", "codyra"): "CoDyRA's gate is a third factor B diag(w) A outside "
                                                   "LoRA-Pro's closed form",
    ("optimizer", "allora", "method", "dylora"): "ALLoRA is scaling-free, while DyLoRA relies on the "
                                                 "rank-dependent scale alpha / b",
    ("optimizer", "allora", "method", "codyra"): "CoDyRA specifies AdamW with its proximal gate schedule",
    ("init", "lora-ga", "method", "mixlora"): "MixLoRA's experts start from the standard init (B = 0), so that "
                                              "the model starts as the base; LoRA-GA offsets the base",
    ("init", "eva", "method", "mixlora"): "MixLoRA's experts on one FFN would all start from the same EVA "
                                          "directions; it uses the standard init",
    ("optimizer", "lora-pro", "method", "mixlora"): "LoRA-Pro's closed form is for one (A, B) pair per layer, "
                                                    "not routed experts",
    ("optimizer", "allora", "method", "mixlora"): "MixLoRA trains routers beside the factors with AdamW",
}
_QUANTIZING_INIT_REFUSALS = {
    "dylora": "the quantized base Q needs the whole low-rank part L1 L2, which a truncated DyLoRA adapter drops",
    "codyra": "CoDyRA's random gates would rescale the low-rank part L1 L2 that completes the quantized base Q",
    "mixlora": "MixLoRA's experts start from the standard init on an unquantized base",
}
_REFUSED.update({("init", init, "method", method): reason for init in ("lq-lora", "loftq")
                 for method, reason in _QUANTIZING_INIT_REFUSALS.items()})
_REFUSED.update({
    **{("init", init, "method", "l4q"): "L4Q quantizes W0 + s B A itself; its base must stay in full precision"
       for init in ("lq-lora", "loftq")},
    ("optimizer", "lora-pro", "method", "l4q"): "LoRA-Pro's closed form is for W0 + s B A, not the quantization "
                                                "grid L4Q trains B A through (with its step sizes beside them)",
    ("optimizer", "allora", "method", "l4q"): "ALLoRA's row-wise rates are for factor rows; L4Q also trains "
                                              "step sizes and offsets",
    ("regularizer", "ba-lora", "method", "l4q"): "BA-LoRA compares with the model without its adapter, which "
                                                 "L4Q's fake-quantized layers cannot switch off",
    **{("init", init, "method", "pat"): "PAT folds its modules into dense weights and cuts them; a quantized "
                                        "base has none" for init in ("lq-lora", "loftq")},
    ("optimizer", "lora-pro", "method", "pat"): "LoRA-Pro steps only the (A, B) pairs; PAT also trains its mask "
                                                "and sparsification modules",
    ("optimizer", "allora", "method", "pat"): "ALLoRA's row-wise rates are for factor rows; PAT also trains its "
                                              "mask and sparsification modules",
    ("regularizer", "ba-lora", "method", "pat"): "BA-LoRA compares with the model without its adapter, and PAT's "
                                                 "masked model stays masked with the adapter switched off",
})


def check_combination(lora: LoraConfig, config: TrainConfig) -> None:
    """Raise a ConfigError naming the pair and the reason if the run's choices (``lora.init`` among them) do
    not combine."""
    chosen = {"init": lora.init, "optimizer": config.optimizer, "method": config.method,
              "regularizer": config.regularizer}
    if config.full and (config.optimizer != "adamw" or config.method != "lora"):
        raise ConfigError(f"full fine-tuning cannot use optimizer={config.optimizer!r} / method={config.method!r}: "
                          "they act on LoRA factors, and full fine-tuning has none")
    for (kind_a, name_a, kind_b, name_b), reason in _REFUSED.items():
        if chosen[kind_a] == name_a and chosen[kind_b] == name_b:
            raise ConfigError(f"{kind_a}={name_a!r} does not combine with {kind_b}={name_b!r}: {reason}")
    if config.optimizer == "allora" and lora.dropout > 0:
        raise ConfigError(f"optimizer='allora' is dropout-free by definition; got dropout={lora.dropout}")
    if config.fsdp:
        _check_sharded(lora, config)


FSDP_OPTIMIZERS = ("adamw",)
"""Optimizers that step sharded parameters shard by shard (the others read whole factors)."""


def _check_sharded(lora: LoraConfig, config: TrainConfig) -> None:
    """Refuse what ``--fsdp`` cannot shard: components that read or replace whole factors between steps, and
    bases that quantize."""
    if config.optimizer not in FSDP_OPTIMIZERS:
        raise ConfigError(f"--fsdp steps sharded parameters shard by shard, and optimizer={config.optimizer!r} "
                          "works on whole factors; use adamw with --fsdp, or train without --fsdp")
    if config.method != "lora" or config.regularizer is not None:
        chosen = f"method={config.method!r}" if config.method != "lora" else f"regularizer={config.regularizer!r}"
        raise ConfigError(f"--fsdp shards every parameter between steps, and {chosen} reads or replaces whole "
                          "factors there; train it without --fsdp (data-parallel)")
    if lora.init in QUANTIZING_INITS:
        raise ConfigError(f"--fsdp shards parameters, and --init {lora.init} makes the base quantized codes, "
                          "which FSDP2 does not shard; train it without --fsdp")
    if config.chunk_size is not None:
        raise ConfigError("--fsdp gathers each unit's weights in every forward, with every rank at once, and "
                          "--chunk-size runs as many forwards as each rank's sequences have chunks; train it "
                          "data-parallel (without --fsdp)")


def scale_free(lora: LoraConfig) -> LoraConfig:
    """``lora`` with alpha set so that every module's scale is 1 (``alpha = r``, or ``sqrt(r)`` with rsLoRA)."""
    def unit(rank: int) -> float:
        return math.sqrt(rank) if lora.use_rslora else float(rank)
    return replace(lora, alpha=unit(lora.rank), alpha_pattern={key: unit(r) for key, r in lora.rank_pattern.items()})


def prepared_lora(lora: LoraConfig, config: TrainConfig) -> LoraConfig:
    """The adapter config a run attaches: scaling-free for ALLoRA and CoDyRA, ``lora`` otherwise."""
    return scale_free(lora) if config.optimizer == "allora" or config.method == "codyra" else lora
