"""The training loop: the chosen optimizer on the trainable parameters, warmup + cosine, accumulation,
clipping, periodic evaluation and checkpoints, exact resume, and a loud stop on a non-finite loss.

Everything method-specific is a :class:`~lorakit.methods.component.TrainingComponent`: those
``TrainConfig.optimizer``, ``.method`` and ``.regularizer`` name (:mod:`lorakit.train.components`), then
any passed as ``components``; the loop calls their hooks at fixed points and knows no method.
``metrics.jsonl`` logs the task loss as ``loss``, the components' extra terms by name and their sum
as ``extra_loss``. Rows whose examples name an adapter (``Encoded.adapter``: several adapters trained in
one batch) each train their own adapter: each adapter's loss is its own rows' mean and its gradient is
clipped on its own.

``train(model, tokenizer, examples, TrainConfig(...), out_dir=...)`` trains whatever requires a
gradient (the attached adapter, or every weight with ``full=True``) and writes the result to
``out_dir`` only when the run completes, so a failed run never replaces a good adapter.

In a process group (``torchrun``: :mod:`lorakit.train.distributed`) each rank trains on its share of every
step's micro-batches and the gradients are summed over the ranks; only rank 0 writes (metrics, checkpoints,
the result) and draws progress bars; evaluation is sharded, each rank scoring every N-th example, the sums
combined.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.config import TrainConfig
from lorakit.data.batching import Batches, Position
from lorakit.data.encoding import Encoded, encode, pad_id
from lorakit.data.example import Example
from lorakit.data.formatting import use_chat
from lorakit.errors import ConfigError, TrainingError
from lorakit.eval.loss import loss_sums
from lorakit.methods.component import TrainingComponent
from lorakit.models.supervised_loss import (
    SupervisedLogits,
    adapter_token_counts,
    batch_tokens,
    logits_loss,
    per_adapter_loss,
    supervised_outputs,
    supervised_tokens,
)
from lorakit.parallel.process_group import Ranks, current_ranks, sum_across_ranks
from lorakit.train.allocator import freed_memory_kept
from lorakit.train.checkpoint import (
    CHECKPOINTS,
    Resumption,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lorakit.train.chunked import ChunkwiseBackward, chunkwise_backward
from lorakit.train.compiled import compiled_body
from lorakit.train.components import adamw, components_for
from lorakit.train.distributed import gathered_rng_states, sum_gradients
from lorakit.train.metrics import MetricsLog
from lorakit.train.output import save_result
from lorakit.train.recompute import recomputed_blocks
from lorakit.train.schedule import learning_rate
from lorakit.train.sharding import (
    clip_gradients,
    full_parameters,
    is_sharded,
    local_parameter_bytes,
    set_gradient_sync,
    shard_model,
)

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """What a finished run did."""

    steps: int
    train_loss: float
    eval_loss: float | None
    out_dir: Path | None
    metrics: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    """How many numbers the optimizer trained."""

    def summary(self) -> dict:
        """The one-line JSON summary the CLI prints."""
        return {"out": str(self.out_dir), "steps": self.steps, "train_loss": self.train_loss,
                "eval_loss": self.eval_loss, "trainable_parameters": self.trainable_parameters}


def _trainable(model: nn.Module, full: bool) -> list[nn.Parameter]:
    if full:
        if getattr(model, "lorakit_state", None) is not None:
            raise ConfigError("full=True trains every weight; remove the model's adapters first")
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ConfigError("nothing to train: attach an adapter (lorakit.attach) or pass full=True")
    return parameters


def adapter_parameter_groups(model: nn.Module, names: Sequence[str]) -> list[list[nn.Parameter]]:
    """Each named adapter's trainable parameters (for clipping each adapter on its own)."""
    from lorakit.core.state import lora_layers
    groups = [[p for _, layer in lora_layers(model) if name in layer.adapters
               for p in layer.adapters[name].parameters() if p.requires_grad] for name in names]
    empty = [name for name, group in zip(names, groups, strict=True) if not group]
    if empty:
        raise ConfigError(f"adapter {empty[0]!r} has no trainable parameters in the model; attach it first")
    return groups


def _prepare_run_dir(out_dir: Path | None, resume: Path | None, overwrite: bool) -> None:
    if out_dir is None or resume is not None or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out_dir} is not empty; resume the run there, choose another directory, or overwrite")
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)


def train(model: nn.Module, tokenizer, examples: Sequence[Example], config: TrainConfig = TrainConfig(), *,
          components: Sequence[TrainingComponent] = (), out_dir: str | Path | None = None,
          eval_examples: Sequence[Example] | None = None, resume: str | Path | None = None,
          overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train ``model`` on ``examples``; see the module docstring. ``components`` are hooks beyond those
    ``config`` names (e.g. a mixture's task loss, or how an init's result is saved); ``resume`` is a run
    directory or checkpoint. The result goes to ``out_dir`` (the first component whose ``save`` writes it,
    else the adapter in PEFT format, or the full model)."""
    out = Path(out_dir) if out_dir is not None else None
    resume_path = Path(resume) if resume is not None else None
    ranks = current_ranks()
    writes = out if ranks.main else None  # only rank 0 writes the run's files
    progress = progress and ranks.main
    components = [*components_for(config), *components]
    for component in components:
        component.attach(model)
    parameters = _trainable(model, config.full)
    chunked = chunkwise_backward(config, components)
    if config.fsdp:
        if not is_sharded(model):  # lorakit train shards its skeleton as it fills it (sharding.shard_and_fill)
            shard_model(model)
        parameters = [p for p in model.parameters() if p.requires_grad]  # the sharded ones now
    _prepare_run_dir(writes, resume_path, overwrite)  # only once the run can start: a refused run deletes nothing
    chat = use_chat(tokenizer, config.chat)
    encoded = [encode(e, tokenizer, chat=chat, max_length=config.max_length) for e in examples]
    for component in components:
        encoded = list(component.batches(encoded))
    eval_encoded = [encode(e, tokenizer, chat=chat, max_length=config.max_length) for e in eval_examples or []]
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    optimizer = _optimizer(components, model, parameters, config)
    start = Resumption(0, Position())
    if resume_path is not None:
        start = load_checkpoint(find_checkpoint(resume_path), model, optimizer, config, components, ranks)
    batches = Batches(encoded, batch_size=config.batch_size, pad_id=pad_id(tokenizer), seed=config.seed,
                      bucket=config.bucket, pack_length=config.max_length if config.pack else None)
    total = config.total_steps(len(batches) * config.batch_size, ranks.world)
    log = MetricsLog(writes / METRICS_FILE if writes is not None else None)
    row_adapters = sorted({e.adapter for e in encoded if e.adapter is not None})
    clip_groups = adapter_parameter_groups(model, row_adapters) if row_adapters else [parameters]
    run = _Run(model, optimizer, config, total, batches, start.data, log, writes, components, parameters,
               clip_groups, ranks, row_adapters, chunked)
    if ranks.distributed:
        log.write(step=start.step, parameter_bytes_per_rank=local_parameter_bytes(model))
    with freed_memory_kept(config.keep_freed_memory), recomputed_blocks(model, config.gradient_checkpointing), \
            compiled_body(model, config.compile):
        train_loss = run.steps_from(start.step, eval_encoded, pad_id(tokenizer), progress)
    for component in components:
        component.finish()
    eval_loss = sharded_mean_loss(model, eval_encoded, config.batch_size, pad_id(tokenizer)) if eval_encoded else None
    if eval_loss is not None:
        log.write(step=total, eval_loss=eval_loss)
    model.eval()
    with full_parameters(model, parameters):  # every rank gathers a sharded model's; rank 0 writes
        if writes is not None and not any(component.save(model, tokenizer, writes) for component in components):
            save_result(model, tokenizer, writes, full=config.full)
    return TrainResult(total, train_loss, eval_loss, out, log.records, sum(p.numel() for p in parameters))


def sharded_mean_loss(model: nn.Module, encoded: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    """The mean token loss over ``encoded``, each rank scoring every N-th example and the sums combined (a lone
    process scores them all). A sharded model needs every rank in each forward, so there each rank scores
    every example."""
    if is_sharded(model):
        total, count = loss_sums(model, encoded, batch_size=batch_size, pad_id=pad_id)
        return total / count if count else float("nan")
    ranks = current_ranks()
    total, count = loss_sums(model, encoded[ranks.rank::ranks.world], batch_size=batch_size, pad_id=pad_id)
    total, count = sum_across_ranks(torch.tensor([total, float(count)], dtype=torch.float64)).tolist()
    return total / count if count else float("nan")


def _optimizer(components: Sequence[TrainingComponent], model: nn.Module, parameters: list[nn.Parameter],
               config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer the one component that supplies it builds, else AdamW; two suppliers are refused."""
    supplied = [(c, o) for c in components if (o := c.optimizer(model, parameters, config)) is not None]
    if len(supplied) > 1:
        names = ", ".join(type(c).__name__ for c, _ in supplied)
        raise ConfigError(f"two components supply the optimizer ({names}); keep one")
    return supplied[0][1] if supplied else adamw(model, parameters, config)


class _Run:
    """The state of one run between steps."""

    def __init__(self, model, optimizer, config: TrainConfig, total: int, batches: Batches, data: Position,
                 log: MetricsLog, out: Path | None, components: Sequence[TrainingComponent],
                 parameters: list[nn.Parameter], clip_groups: list[list[nn.Parameter]], ranks: Ranks,
                 row_adapters: list[str], chunked: ChunkwiseBackward | None) -> None:
        self.model, self.optimizer, self.config, self.components = model, optimizer, config, components
        self.parameters, self.clip_groups = parameters, clip_groups
        """Parameters whose gradient norm is clipped together: all of them, or each adapter's own."""
        self.total, self.log, self.out = total, log, out
        """``out``: where checkpoints go (None on ranks other than 0)."""
        self.batches, self.positions, self.next_data = batches, batches.positions(data), data
        self.warmup = config.warmup_for(total)
        self.ranks, self.row_adapters, self.chunked = ranks, row_adapters, chunked
        """``chunked``: back-propagates each micro-batch chunk by chunk (SeCO, SpaCO), or None."""
        self.first_micro_batch = ranks.rank * config.grad_accum
        """The index of this rank's first micro-batch among the step's (over all ranks)."""
        self.micro_batches = config.grad_accum * ranks.world
        """Micro-batches per optimizer step over all ranks; this rank trains ``grad_accum`` of them."""
        self.reduced_bytes = 0
        """Gradient bytes the last step all-reduced (0 in a lone process, and with FSDP, which reduce-scatters)."""
        self.sharded = is_sharded(model)

    def steps_from(self, first: int, eval_encoded, pad_id: int, progress: bool) -> float:
        """Run steps ``first .. total - 1``; returns the last step's loss."""
        self.model.train()
        bar = tqdm(total=self.total, initial=first, disable=not progress, desc="train", unit="step")
        loss, tokens, started = float("nan"), 0, time.perf_counter()
        for step in range(first, self.total):
            for component in self.components:
                component.before_step(step, self.total)
            loss, terms, step_tokens = self._step(step)
            for component in self.components:
                component.after_step(step, self.total)
            tokens += step_tokens
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            done = step + 1
            if done % max(1, self.config.log_every) == 0 or done == self.total:
                extra = {"extra_loss": sum(terms.values()), **terms} if terms else {}
                if self.ranks.distributed and not self.sharded:
                    extra["allreduced_bytes"] = self.reduced_bytes
                self.log.write(step=done, loss=loss, **extra, lr=self.optimizer.param_groups[0]["lr"],
                               tokens_per_s=tokens / max(elapsed, 1e-9), elapsed_s=elapsed)
            if self.config.eval_every and done % self.config.eval_every == 0 and eval_encoded and done < self.total:
                self.log.write(step=done, eval_loss=sharded_mean_loss(self.model, eval_encoded,
                                                                      self.config.batch_size, pad_id))
                self.model.train()
            if self.config.save_every and done % self.config.save_every == 0:
                rng_states = gathered_rng_states()  # every rank takes part; rank 0 writes
                if self.out is not None or self.sharded:  # sharded tensors are gathered by every rank
                    save_checkpoint(self.out, self.model, self.optimizer, Resumption(done, self.next_data),
                                    self.config, self.config.keep_checkpoints, self.components, rng_states)
        bar.close()
        return loss

    def _step(self, step: int) -> tuple[float, dict[str, float], int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (task loss, extra terms by name, tokens)."""
        lr = learning_rate(step, total=self.total, warmup=self.warmup, peak=self.config.lr,
                           min_ratio=self.config.min_lr_ratio)
        for group in self.optimizer.param_groups:  # a component's group may run at a multiple (``lr_scale``)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches = self._own_batches()
        task_loss_of = self._task_loss(batches)
        task_loss, terms = 0.0, {}
        for index, batch in enumerate(batches):
            if self.chunked is not None:
                task_loss += self.chunked(self.model, batch, task_loss_of, step=step,
                                          micro_batch=self.first_micro_batch + index,
                                          check=lambda value: self._check_finite(step, value))
                continue
            set_gradient_sync(self.model, index == len(batches) - 1)  # FSDP: reduce after the last micro-batch
            outputs = supervised_outputs(self.model, batch)
            extra = self._extra_losses(batch, outputs)  # first: logits they ask for are reused
            loss = task_loss_of(outputs, batch)
            total = loss + sum(extra.values(), torch.zeros((), device=outputs.device))
            self._check_finite(step, total.item())
            total.backward()
            task_loss += loss.item()
            for name, value in extra.items():
                terms[name] = terms.get(name, 0.0) + value.item()
            del outputs  # (M, V) logits: not kept alive through the next micro-batch's forward
        if not self.sharded:
            self.reduced_bytes = sum_gradients(self.parameters)  # once per step, after the rank's last micro-batch
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        for group in self.clip_groups:
            norm = clip_gradients(group, max_norm)
            if not torch.isfinite(norm):
                self._diverged(step, float(norm), what="gradient norm")
        if not any(component.step(self.optimizer) for component in self.components):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._over_ranks(task_loss, terms, sum(batch_tokens(b) for b in batches))

    def _task_loss(self, batches: list[dict]) -> Callable[[SupervisedLogits, dict], torch.Tensor]:
        """The step's loss of one micro-batch: the sum over supervised tokens divided by the step's token
        count (over all ranks), or, with several adapters in the batch, each adapter's own mean
        (:func:`per_adapter_loss`)."""
        if self.row_adapters:
            own = adapter_token_counts(batches)
            summed = sum_across_ranks(torch.tensor([own.get(name, 0) for name in self.row_adapters]))
            counts = dict(zip(self.row_adapters, summed.tolist(), strict=True))
            return lambda outputs, batch: per_adapter_loss(outputs, batch, counts)
        count = max(1, int(sum_across_ranks(torch.tensor(sum(supervised_tokens(b) for b in batches)))))
        return lambda outputs, batch: logits_loss(outputs) / count

    def _extra_losses(self, batch: dict, outputs: SupervisedLogits) -> dict[str, torch.Tensor]:
        """The components' extra terms for one micro-batch, each averaged over the step's micro-batches (those of
        every rank: the gradients are summed over the ranks)."""
        terms: dict[str, torch.Tensor] = {}
        for component in self.components:
            for name, value in component.losses(batch, outputs).items():
                if name in terms:
                    raise TrainingError(f"two components of the run add a loss named {name!r}")
                terms[name] = value / self.micro_batches
        return terms

    def _own_batches(self) -> list[dict]:
        """This rank's micro-batches of the step: ``grad_accum`` consecutive ones of the step's ``grad_accum x
        world`` (module docstring of :mod:`lorakit.train.distributed`); the others are skipped uncollated."""
        first = self.first_micro_batch
        own = []
        for index in range(self.micro_batches):
            position, indices = next(self.positions)
            self.next_data = position.following(len(self.batches))
            if first <= index < first + self.config.grad_accum:
                own.append(self.batches.collate([self.batches.items[i] for i in indices]))
        return own

    def _over_ranks(self, task_loss: float, terms: dict[str, float],
                    tokens: int) -> tuple[float, dict[str, float], int]:
        """The step's logged task loss, extra terms and tokens summed over the ranks (a lone process: as they are)."""
        if not self.ranks.distributed:
            return task_loss, terms, tokens
        names = sorted(terms)
        summed = sum_across_ranks(torch.tensor([task_loss, float(tokens), *(terms[n] for n in names)],
                                               dtype=torch.float64)).tolist()
        return summed[0], dict(zip(names, summed[2:], strict=True)), int(summed[1])

    def _check_finite(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            self._diverged(step, loss)

    def _diverged(self, step: int, value: float, what: str = "training loss") -> None:
        self.optimizer.zero_grad(set_to_none=True)
        kept = list_checkpoints(self.out) if self.out is not None else []
        where = (f"the last good checkpoint is {kept[-1]} (continue with resume)" if kept
                 else "no checkpoint had been written")
        raise TrainingError(f"the {what} became {value} at step {step + 1}; the run stopped before updating the "
                            f"weights, {where}, and no adapter was written")
