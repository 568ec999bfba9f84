"""Frozen, validated configuration objects.

Every config is a ``@dataclass(frozen=True, kw_only=True)``; ``__post_init__`` validates without
mutating, and an error names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError

ALL_LINEAR = "all-linear"
"""Target shorthand: every linear layer (``nn.Linear`` and GPT-2 ``Conv1D``) except the output head."""

INITS: Mapping[str, str] = {
    "kaiming": "A Kaiming-uniform, B = 0 (embeddings: A = 0, B normal), PEFT's default",
    "gaussian": "A ~ N(0, 1/r^2), B = 0",
    "zeros": "A = B = 0",
    "lora-ga": "LoRA-GA: A, B from the SVD of the gradient on the first training batches, the base offset",
    "eva": "EVA: A from the principal components of each layer's inputs, ranks redistributed",
    "lq-lora": "LQ-LoRA: each base quantized to Q with W ~= Q + B A, one config per matrix under --bits",
    "loftq": "LoftQ: each base quantized to NF4 Q with W ~= Q + B A",
}
"""Every way an adapter can start, by the one name Python (``LoraConfig.init``) and the CLI (``--init``) use."""
DATA_DRIVEN_INITS = frozenset({"lora-ga", "eva", "lq-lora", "loftq"})
QUANTIZING_INITS = frozenset({"lq-lora", "loftq"})
"""The inits that quantize the base themselves (so ``--quantize`` does not apply)."""
"""The inits computed before the adapter exists (all but LoftQ look at training data): ``attach`` refuses them;
:func:`lorakit.train.prepare.prepare_adapter` (what ``lorakit train --init`` runs) estimates, then attaches."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _require(condition: bool, field_name: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{field_name}: {pattern!r} is not a valid regular expression ({err})") from None


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """How one LoRA adapter is shaped and where it attaches (Hu et al. 2021; rsLoRA, Kalajdzievski 2023).

    The adapted layer computes ``h = W0 x + s * B A dropout(x)`` with ``A`` (r x d_in), ``B`` (d_out x r)
    and ``s = alpha / r``, or ``s = alpha / sqrt(r)`` with ``use_rslora``.
    """

    rank: int = 8
    """The rank ``r`` of ``B A``; a positive integer."""
    alpha: float = 8.0
    """The numerator of the scale ``s``; positive."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input only (the base path never sees it); in [0, 1)."""
    targets: str | tuple[str, ...] | list[str] = ALL_LINEAR
    """``"all-linear"``, a regular expression matched against the full module name, or a tuple of
    module names, each matching a module whose full name equals it or ends with ``"." + name``."""
    exclude: str | tuple[str, ...] | list[str] | None = None
    """Modules never to wrap, in the same forms as ``targets`` (``"all-linear"`` excepted)."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``s = alpha / sqrt(r)`` instead of ``alpha / r``."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: a key is a regular expression matched against the end of a module
    name (as ``re.match(rf"(.*\\.)?({key})$", name)``, PEFT's rule); the first match wins."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, matched like ``rank_pattern``."""
    init: str = "kaiming"
    """How the adapter starts, one of :data:`INITS`: ``"kaiming"``, ``"gaussian"`` and ``"zeros"`` leave the
    model unchanged; ``"lora-ga"``, ``"eva"``, ``"lq-lora"`` and ``"loftq"`` are computed (the first three from
    data) by :func:`lorakit.train.prepare.prepare_adapter`."""

    def __post_init__(self) -> None:
        _require(_is_int(self.rank) and self.rank > 0,
                 "rank", self.rank, "a positive integer is required")
        _require(_is_finite_number(self.alpha) and self.alpha > 0,
                 "alpha", self.alpha, "a positive finite number is required")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                 "dropout", self.dropout, "a probability in [0, 1) is required")
        _require(self.init in INITS, "init", self.init, f"one of {', '.join(INITS)}")
        self._check_modules("targets", self.targets, allow_all_linear=True)
        if self.exclude is not None:
            self._check_modules("exclude", self.exclude, allow_all_linear=False)
        for key, rank in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            _require(_is_int(rank) and rank > 0, f"rank_pattern[{key!r}]", rank,
                     "a positive integer is required")
        for key, alpha in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            _require(_is_finite_number(alpha) and alpha > 0, f"alpha_pattern[{key!r}]", alpha,
                     "a positive finite number is required")

    @staticmethod
    def _check_modules(field_name: str, value: Any, *, allow_all_linear: bool) -> None:
        if isinstance(value, str):
            if value == ALL_LINEAR:
                _require(allow_all_linear, field_name, value, "'all-linear' is only meaningful for targets")
            else:
                _check_regex(field_name, value)
            return
        _require(isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, str) and v for v in value),
                 field_name, value, "'all-linear', a regular expression, or a non-empty tuple of module names")

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on ``module_name``, after ``rank_pattern``."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the adapter on ``module_name``, after ``alpha_pattern``."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, module_name: str) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) on ``module_name``."""
        rank = self.rank_for(module_name)
        denominator = math.sqrt(rank) if self.use_rslora else rank
        return self.alpha_for(module_name) / denominator


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """The first key of ``patterns`` that matches the end of ``module_name`` (PEFT's matching rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


QUANTIZED_INIT_GRIDS = ("small", "lq-lora")
SPARSE_CHUNK_ESTIMATORS = ("paper", "unbiased")
"""How SpaCO draws and weights its chunks (:mod:`lorakit.train.chunk_weights`)."""
"""The names of LQ-LoRA's candidate config grids (:data:`lorakit.init.lq_lora.CONFIG_GRIDS`)."""


@dataclass(frozen=True, kw_only=True)
class QuantizedInitConfig:
    """How the quantizing inits ``"lq-lora"`` and ``"loftq"`` (Guo et al., ICLR 2024; Li et al., ICLR 2024)
    decompose each base weight as ``W ~= Q + L1 L2``."""

    bits: float = 2.75
    """LQ-LoRA's bit budget per parameter over all adapted weights (codes and both levels of scales)."""
    fisher_batches: int = 0
    """LQ-LoRA: training examples whose squared gradients weight the decomposition (0: unweighted)."""
    iterations: int | None = None
    """Most alternations per matrix (None: LQ-LoRA's 100, LoftQ's 1)."""
    grid: str = "small"
    """LQ-LoRA's candidate configs: small (8) or lq-lora (the paper's 288)."""
    bit_chunks: int = 1
    """LQ-LoRA: solve the bit allocation separately over this many consecutive groups of the adapted matrices,
    each within the budget (smaller integer programs for large models, at a little more error)."""

    def __post_init__(self) -> None:
        _require(_is_finite_number(self.bits) and self.bits > 0, "bits", self.bits, "a positive number is required")
        _require(_is_int(self.fisher_batches) and self.fisher_batches >= 0, "fisher_batches", self.fisher_batches,
                 "a non-negative integer is required")
        _require(self.iterations is None or (_is_int(self.iterations) and self.iterations > 0), "iterations",
                 self.iterations, "a positive integer or None is required")
        _require(_is_int(self.bit_chunks) and self.bit_chunks >= 1, "bit_chunks", self.bit_chunks,
                 "a positive integer is required")
        _require(self.grid in QUANTIZED_INIT_GRIDS, "grid", self.grid, f"one of {', '.join(QUANTIZED_INIT_GRIDS)}")


LORAM_IMPORTANCES = ("gradient", "magnitude", "random")
LORAM_RECOVERIES = ("zero", "normal")


@dataclass(frozen=True, kw_only=True)
class LoramConfig:
    """LoRAM (Zhang et al., ICLR'25, arXiv 2502.13533): train the adapter on a structurally pruned copy of the base,
    then recover it to the full base's shapes."""

    ratio: float | None = None
    """The share of each pruned block's FFN channels, and at most that share of its key/value head groups (whole
    groups, with their query heads), removed; 0 prunes nothing; None (the default) trains without LoRAM."""
    importance: str = "gradient"
    """How structures are ranked: ``gradient`` (first-order Taylor |w dL/dw| summed over a structure's weights, on
    the first training batches), ``magnitude`` (the structure's weight norm) or ``random``."""
    importance_batches: int = 4
    """Training batches the ``gradient`` importance sums over."""
    keep_first: int = 2
    """Blocks at the start left whole (the paper prunes blocks 4 to 77 of 80)."""
    keep_last: int = 1
    """Blocks at the end left whole."""
    align_steps: int = 0
    """Steps of continued pre-training of the pruned model on the offline English corpus before LoRA (0: none)."""
    align_lr: float = 5e-5
    """The alignment's learning rate (the paper's)."""
    recover: str = "zero"
    """Recovery of ``A`` of o_proj/down_proj at pruned input columns: zeros (``zero``, the paper's default) or
    N(0, 1/r) noise (``normal``, the paper's "normA"); ``B`` rows at pruned outputs are always zero."""

    def __post_init__(self) -> None:
        _require(self.ratio is None or (_is_finite_number(self.ratio) and 0 <= self.ratio < 1), "loram ratio",
                 self.ratio, "a fraction in [0, 1) is required")
        _require(self.importance in LORAM_IMPORTANCES, "loram importance", self.importance,
                 f"one of {', '.join(LORAM_IMPORTANCES)}")
        for name in ("importance_batches", "keep_first", "keep_last", "align_steps"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= (1 if name == "importance_batches" else 0), f"loram {name}", value,
                     "a positive integer is required" if name == "importance_batches" else
                     "a non-negative integer is required")
        _require(_is_finite_number(self.align_lr) and self.align_lr > 0, "loram align_lr", self.align_lr,
                 "a positive number is required")
        _require(self.recover in LORAM_RECOVERIES, "loram recover", self.recover,
                 f"one of {', '.join(LORAM_RECOVERIES)}")

    @property
    def enabled(self) -> bool:
        return self.ratio is not None


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How a training run goes: the optimizer (AdamW by default) on the trainable parameters, linear warmup
    then cosine decay, and any training method or regularizer."""

    steps: int | None = None
    """Optimizer steps to take; exactly one of ``steps`` and ``epochs`` is set (default: 100 steps)."""
    epochs: float | None = None
    """Passes over the training data (may be fractional), instead of ``steps``."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all their supervised tokens."""
    lr: float = 2e-4
    """Peak learning rate."""
    warmup_steps: int | None = None
    """Linear warmup length; default 5% of the steps (at least 1)."""
    min_lr_ratio: float = 0.0
    """The cosine decays to ``lr * min_lr_ratio``."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; ``None`` disables clipping."""
    max_length: int = 256
    """Examples are truncated to this many tokens."""
    seed: int = 0
    """Seeds the data order, dropout and any random initialisation."""
    eval_every: int = 0
    """Evaluate the loss on the evaluation data every this many steps (0: only at the end)."""
    save_every: int = 0
    """Write a resumable checkpoint every this many steps (0: none)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    bucket: bool = True
    """Group examples of similar length into batches (less padding)."""
    pack: bool = False
    """Pack several short examples into one row of ``max_length`` tokens."""
    chat: bool | None = None
    """Render prompts with the tokenizer's chat template; ``None``: when it has one."""
    full: bool = False
    """Full fine-tuning: every parameter of the model trains (a baseline for LoRA)."""
    fsdp: bool = False
    """Under torchrun: shard the model across the ranks with FSDP2, block by block (bases that do not fit one
    device); the result is the same as without."""
    optimizer: str = "adamw"
    """The optimizer, by its name in :mod:`lorakit.train.components` (the trainer checks it)."""
    method: str = "lora"
    """The training method, by its name in :mod:`lorakit.train.components`; docs/METHODS.md says which
    methods, optimizers and regularizers combine."""
    regularizer: str | None = None
    """An extra loss term, by its name in :mod:`lorakit.train.components`, or None."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Settings of the chosen optimizer, method and regularizer, by name: ``{"allora_eta": 2.0}``,
    on the command line ``--option allora_eta=2``; each one's defaults are in :mod:`lorakit.train.components`."""
    keep_freed_memory: bool = False
    """Keep memory freed between training steps in the process for the next step instead of returning it to
    the operating system (glibc's ``mallopt``; :mod:`lorakit.train.allocator`): on a CPU each step then skips
    re-mapping its activations (5-8% of a step on the default model), at the cost of holding up to 1 GiB
    of freed memory while training. The previous settings are restored when ``train()`` returns."""
    gradient_checkpointing: bool = False
    """Keep only each decoder block's inputs in the forward and recompute the block in the backward
    (:mod:`lorakit.train.recompute`): less activation memory for about a third more compute."""
    compile: bool = False
    """Compile the model's decoder body with ``torch.compile`` for the training steps
    (:mod:`lorakit.train.compiled`): less activation memory, after a compilation of minutes; for long runs."""
    chunk_size: int | None = None
    """SeCO: back-propagate each sequence chunk by chunk, this many tokens a chunk, with the exact gradient
    (:mod:`lorakit.train.chunked`): activation memory of one chunk's graph plus the key/value cache and its
    gradient, for one extra forward of the sequence."""
    sparse_chunks: int | None = None
    """SpaCO: back-propagate only this many chunks of each sequence (needs ``chunk_size``), drawn anew for each
    micro-batch and weighted to compensate (:mod:`lorakit.train.chunk_weights`)."""
    sparse_chunk_estimator: str = "paper"
    """How SpaCO draws and weights its chunks, one of ``SPARSE_CHUNK_ESTIMATORS``
    (:mod:`lorakit.train.chunk_weights`)."""

    def __post_init__(self) -> None:
        _require(self.steps is None or self.epochs is None, "steps", self.steps,
                 "set steps or epochs, not both")
        _require(self.steps is None or (isinstance(self.steps, int) and self.steps > 0), "steps", self.steps,
                 "a positive integer is required")
        _require(self.epochs is None or (isinstance(self.epochs, (int, float)) and self.epochs > 0), "epochs",
                 self.epochs, "a positive number is required")
        for name in ("batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "a positive integer is required")
        for name in ("eval_every", "save_every", "log_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, name, value, "a non-negative integer is required")
        _require(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1, "keep_checkpoints",
                 self.keep_checkpoints, "at least 1")
        _require(_is_finite_number(self.lr) and self.lr > 0, "lr", self.lr,
                 "a positive finite number is required")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a non-negative number")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm,
                 "a positive number or None")
        _require(self.warmup_steps is None or (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0),
                 "warmup_steps", self.warmup_steps, "a non-negative integer or None")
        for name in ("chunk_size", "sparse_chunks"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and value > 0), name, value,
                     "a positive integer or None")
        _require(self.sparse_chunks is None or self.chunk_size is not None, "sparse_chunks", self.sparse_chunks,
                 "SpaCO samples chunks: set chunk_size too")
        _require(self.sparse_chunk_estimator in SPARSE_CHUNK_ESTIMATORS, "sparse_chunk_estimator",
                 self.sparse_chunk_estimator, f"one of {', '.join(SPARSE_CHUNK_ESTIMATORS)}")

    def total_steps(self, n_examples: int, ranks: int = 1) -> int:
        """The number of optimizer steps for ``n_examples`` training examples (on ``ranks`` data-parallel
        processes, each taking ``grad_accum`` micro-batches a step)."""
        if self.epochs is None:
            return self.steps if self.steps is not None else 100
        per_epoch = math.ceil(n_examples / self.batch_size) / (self.grad_accum * ranks)
        return max(1, math.ceil(per_epoch * self.epochs))

    def warmup_for(self, total_steps: int) -> int:
        """The warmup length for a run of ``total_steps`` steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return max(1, round(0.05 * total_steps))
