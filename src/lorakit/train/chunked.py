"""Chunk-wise back-propagation of one micro-batch (``TrainConfig.chunk_size``, ``.sparse_chunks``): SeCO and
SpaCO (Li et al., 2025, "Sequential Chunk-wise Optimization for Efficient Long-Context Fine-tuning").

A sequence of ``T`` tokens is cut into chunks of ``C``. Without gradients, the chunks run in order, each attending
over the keys and values the earlier ones left in a cache (the loss of a chunk that will not be back-propagated is
taken here). Then the chunks run again in reverse order, each with gradients: chunk ``i`` attends over the
earlier chunks' keys and values as leaves, and back-propagates

    loss_i + sum_l <K_i^l, dL/dK_i^l> + <V_i^l, dL/dV_i^l>

where ``dL/dK_i^l`` is what the later chunks' backward left on chunk ``i``'s keys in layer ``l`` (collected from
their leaves). The parameter gradients add up to those of back-propagating the whole sequence (chunk ``i``'s
outputs depend on the parameters directly and through the earlier chunks' keys and values, and each path is
counted once); only one chunk's graph is alive at a time, beside the cache and its gradient: activation memory
grows with ``C`` and the cache instead of ``T`` x the graph of a token. Compute: one extra forward of the sequence.
The chunks attend over un-repeated grouped key/value heads (:mod:`lorakit.models.grouped_attention`), and each
earlier chunk's key/value gradient is added to the cache's as the backward produces it, one layer at a time.

Dropout draws the same masks in both passes (each chunk's random state is saved in the first and restored in the
second). :mod:`lorakit.train.chunk_weights` says which chunks are back-propagated (SpaCO: a sample) and with what
weights; a row's weights scale its loss terms (a gradient hook on the rows' outputs) and the key/value gradient
its chunk receives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from lorakit.config import TrainConfig
from lorakit.data.encoding import IGNORE_INDEX
from lorakit.errors import ConfigError
from lorakit.methods.component import TrainingComponent
from lorakit.models.chunk_cache import ChunkCache, KeyValues, cache_keyword, chunk_forward_inputs
from lorakit.models.grouped_attention import grouped_query_attention
from lorakit.models.supervised_loss import SupervisedLogits, next_token_labels, outputs_at_targets
from lorakit.train.chunk_weights import ChunkWeights, SparseChunks, chunk_weights

LossOf = Callable[[SupervisedLogits, dict], torch.Tensor]


def _ignore(value: object) -> None:
    """The default ``check``: nothing to do."""


def check_chunkwise(config: TrainConfig, components: Sequence[TrainingComponent]) -> None:
    """Refuse, with chunk-wise training, components that add a loss of the whole sequence's outputs (MixLoRA's
    balance, BA-LoRA's terms) and ``compile``."""
    if config.chunk_size is None:
        return
    adding = [type(c).__name__ for c in components if type(c).losses is not TrainingComponent.losses]
    if adding:
        raise ConfigError(f"chunk-wise training back-propagates the task loss chunk by chunk; {adding[0]} adds a "
                          "loss of the whole sequence's outputs. Train it without --chunk-size")
    if config.compile:
        raise ConfigError("--compile compiles the body for whole sequences; chunk-wise training runs it on chunks "
                          "over a growing cache (a compilation per chunk). Use one of --compile and --chunk-size")


def chunkwise_backward(config: TrainConfig, components: Sequence[TrainingComponent]) -> ChunkwiseBackward | None:
    """What ``config.chunk_size`` / ``.sparse_chunks`` ask for (None: whole sequences), checked
    (:func:`check_chunkwise`)."""
    check_chunkwise(config, components)
    if config.chunk_size is None:
        return None
    sparse = None if config.sparse_chunks is None else \
        SparseChunks(config.sparse_chunks, config.sparse_chunk_estimator, config.seed)
    return ChunkwiseBackward(config.chunk_size, sparse)


class ChunkwiseBackward:
    """Back-propagates micro-batches chunk by chunk: ``chunk_size`` tokens a chunk, every chunk (SeCO) or
    ``sparse``'s draw (SpaCO)."""

    def __init__(self, chunk_size: int, sparse: SparseChunks | None = None) -> None:
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
        self.chunk_size, self.sparse = chunk_size, sparse

    def __call__(self, model: nn.Module, batch: dict, loss_of: LossOf, *, step: int, micro_batch: int,
                 check: Callable[[float], None] = _ignore) -> float:
        """Accumulate the gradient of ``loss_of`` over ``batch`` into the parameters' ``.grad`` and return the loss
        (see :meth:`ChunkedSequence.backpropagate`); SpaCO draws for micro-batch ``micro_batch`` of ``step``."""
        sequence = ChunkedSequence(model, batch, self.chunk_size)
        generator = self.sparse.generator(step, micro_batch) if self.sparse is not None else None
        weights = chunk_weights(sequence.chunks_per_row, len(sequence.bounds), self.sparse, generator)
        return sequence.backpropagate(weights, loss_of, check=check)


class ChunkedSequence:
    """One micro-batch's chunks: their cache of keys and values, its gradient, and each chunk's random state."""

    def __init__(self, model: nn.Module, batch: dict, chunk_size: int) -> None:
        self.model, self.batch, self.chunk_size = model, batch, chunk_size
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.layers = model.config.num_hidden_layers
        self.keyword = cache_keyword(model)
        length = batch["input_ids"].shape[1]
        self.bounds = [(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]
        self.targets = next_token_labels(batch["labels"]).to(self.device)  # (B, T)
        self.chunks_per_row = self._chunks_per_row()
        """Each row's chunks up to its last one with a loss."""
        self.cache: list[KeyValues] = []      # per layer: (B, H, T, D) keys, values of the chunks run so far
        self.gradient: list[KeyValues] = []   # per layer: what later chunks' backward left on them
        self.rng_states: list[tuple[torch.Tensor, ...]] = []
        self._check_window(length)

    def _check_window(self, length: int) -> None:
        window = getattr(self.model.config, "sliding_window", None)
        if window is not None and getattr(self.model.config, "use_sliding_window", True) and window < length:
            raise ConfigError(f"chunk-wise training builds full causal masks, and this model attends within a "
                              f"sliding window of {window} tokens, shorter than the batch's {length}")

    def backpropagate(self, weights: ChunkWeights, loss_of: LossOf, *,
                      check: Callable[[float], None] = _ignore) -> float:
        """Accumulate the gradient of ``loss_of`` (the chunks' terms weighted by ``weights``) into the parameters'
        ``.grad``; returns the unweighted loss of every chunk. ``check(value)`` is called with each chunk's loss
        before anything uses it."""
        last = max(self.chunks_per_row, default=0) - 1  # the last chunk with a loss
        # A draw of no chunk still back-propagates one, weighted 0: every trainable parameter gets its (zero) gradient.
        trained = [i for i in range(len(self.bounds)) if weights.trained(i)] or [self._first_with_loss()]
        until = last if last in trained else last + 1  # later untrained chunks run for their loss
        with grouped_query_attention(self.model):  # the backward too: checkpointing recomputes in it
            loss = self.forward_without_gradients(until=until, scored=set(trained), loss_of=loss_of, check=check)
            for chunk in reversed(trained):
                loss += self.backward_chunk(chunk, weights, loss_of, check)
        return loss

    def _first_with_loss(self) -> int:
        """The first chunk holding a token with a loss (0 if none does)."""
        positions = (self.targets != IGNORE_INDEX).any(dim=0).nonzero()
        return int(positions[0]) // self.chunk_size if len(positions) else 0

    def _chunks_per_row(self) -> list[int]:
        has_target = self.targets != IGNORE_INDEX
        last = torch.where(has_target.any(dim=1), has_target.shape[1] - 1 - has_target.flip(1).int().argmax(1), -1)
        return [int(t) // self.chunk_size + 1 if t >= 0 else 0 for t in last.tolist()]

    def forward_without_gradients(self, *, until: int, scored: set[int], loss_of: LossOf,
                                  check: Callable[[float], None]) -> float:
        """Run chunks ``0 .. until - 1`` without gradients, filling the cache and saving each one's random state
        (and the state chunk ``until`` starts from); returns the loss of those not in ``scored``."""
        loss = 0.0
        with torch.no_grad():
            for chunk in range(until):
                self.rng_states.append(_rng_state(self.device))
                outputs, cache = self._forward(chunk, None if chunk == 0 else self._prefix(chunk, leaves=False))
                self._store(chunk, cache.own_layers(self.layers))
                if chunk not in scored and outputs.targets.numel():
                    value = loss_of(outputs, self.batch).item()
                    check(value)
                    loss += value
        self.rng_states.append(_rng_state(self.device))
        return loss

    def backward_chunk(self, chunk: int, weights: ChunkWeights, loss_of: LossOf,
                       check: Callable[[float], None]) -> float:
        """Rebuild ``chunk``'s graph over the cache as leaves and back-propagate its weighted loss and carried
        key/value gradient; the leaves' gradients join the cache's. Returns the chunk's (unweighted) loss."""
        carried_in = bool(self.gradient)  # a later chunk's backward left gradients on the cache
        prefix = self._prefix(chunk, leaves=True) if chunk else None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            _set_rng_state(self.rng_states[chunk], self.device)
            outputs, cache = self._forward(chunk, prefix)
        own = cache.own_layers(self.layers)
        loss = loss_of(outputs, self.batch)  # 0 without targets, still part of the backward
        value = loss.item()
        check(value)
        row_weights = weights.loss[:, chunk].to(self.device)
        if not bool((row_weights == 1).all()):
            _scale_rows(outputs, row_weights)
        tensors, grads = [loss], [torch.ones_like(loss)]
        if carried_in:
            start, end = self.bounds[chunk]
            carried = weights.carried[:, chunk].to(self.device, self.dtype)[:, None, None, None]
            for pair, pair_grads in zip(own, self.gradient, strict=True):
                for tensor, grad in zip(pair, pair_grads, strict=True):
                    if tensor.requires_grad:  # not: keys of a first layer without trainable weights before them
                        tensors.append(tensor)
                        grads.append(grad[:, :, start:end] * carried)
        torch.autograd.backward(tensors, grads)
        return value

    def _forward(self, chunk: int, prefix: list[KeyValues] | None) -> tuple[SupervisedLogits, ChunkCache]:
        start, end = self.bounds[chunk]
        inputs = chunk_forward_inputs(self.batch, start, end, self.dtype, self.device)
        cache = ChunkCache(prefix)
        outputs = outputs_at_targets(self.model, {**inputs, self.keyword: cache, "use_cache": False},
                                     self.targets[:, start:end], self.batch.get("adapter_per_row"))
        return outputs, cache

    def _prefix(self, chunk: int, *, leaves: bool) -> list[KeyValues]:
        """The cache up to ``chunk``: views (the forward without gradients), or leaves whose gradient is added to
        the cache's gradient as soon as the backward has it, and then dropped (one layer's at a time in memory)."""
        start = self.bounds[chunk][0]
        if not leaves:
            return [(keys[:, :, :start], values[:, :, :start]) for keys, values in self.cache]
        prefix = []
        for pair, pair_grads in zip(self.cache, self._gradient(), strict=True):
            leaf_pair = []
            for tensor, grad in zip(pair, pair_grads, strict=True):
                leaf = tensor[:, :, :start].detach().requires_grad_()
                leaf.register_post_accumulate_grad_hook(partial(_move_grad, into=grad[:, :, :start]))
                leaf_pair.append(leaf)
            prefix.append(tuple(leaf_pair))
        return prefix

    def _store(self, chunk: int, own: list[KeyValues]) -> None:
        start, end = self.bounds[chunk]
        if not self.cache:
            length = self.bounds[-1][1]
            self.cache = [tuple(t.new_empty(*t.shape[:2], length, t.shape[3]) for t in pair) for pair in own]
        for (keys, values), (new_keys, new_values) in zip(self.cache, own, strict=True):
            keys[:, :, start:end] = new_keys
            values[:, :, start:end] = new_values

    def _gradient(self) -> list[KeyValues]:
        if not self.gradient:
            self.gradient = [(torch.zeros_like(keys), torch.zeros_like(values)) for keys, values in self.cache]
        return self.gradient


def _move_grad(leaf: torch.Tensor, into: torch.Tensor) -> None:
    into += leaf.grad
    leaf.grad = None


def _scale_rows(outputs: SupervisedLogits, row_weights: torch.Tensor) -> None:
    """Multiply the gradient reaching each row's outputs by its weight (the loss is a sum of rows' terms)."""
    selected = outputs.hidden if outputs.hidden is not None else outputs.logits  # what the loss is computed from
    factor = row_weights[outputs.rows].to(selected.dtype)[:, None]  # (M, 1)
    selected.register_hook(lambda grad: grad * factor)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, ...]:
    cuda = (torch.cuda.get_rng_state(device),) if device.type == "cuda" else ()
    return (torch.get_rng_state(), *cuda)


def _set_rng_state(state: tuple[torch.Tensor, ...], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
