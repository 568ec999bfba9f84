"""The training loop: the chosen optimizer on the trainable parameters, warmup + cosine, accumulation,
clipping, periodic evaluation and checkpoints, exact resume, and a loud stop on a non-finite loss.

``TrainConfig.optimizer``, ``.method`` and ``.regularizer`` pick the optimizer and the loop hooks
(:mod:`lorakit.train.components`); ``metrics.jsonl`` logs the task loss as ``loss`` and any
regularizer's or mixture's share of the objective (the extensions' loss terms) as
``extra_loss``.

``train(model, tokenizer, examples, TrainConfig(...), out_dir=...)`` trains whatever requires a
gradient (the attached adapter, or every weight with ``full=True``) and writes the result to
``out_dir`` only when the run completes, so a failed run never replaces a good adapter.
"""

from __future__ import annotations

import dataclasses
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
from lorakit.data.encoding import encode, pad_id
from lorakit.data.example import Example
from lorakit.data.formatting import use_chat
from lorakit.errors import ConfigError, TrainingError
from lorakit.train.allocator import reuse_freed_memory
from lorakit.train.checkpoint import (CHECKPOINTS, Resumption, find_checkpoint, list_checkpoints, load_checkpoint,
                                      save_checkpoint)
from lorakit.eval.loss import mean_loss
from lorakit.train.compiled import compiled_body
from lorakit.train.components import build_extensions, build_optimizer, check_components
from lorakit.methods.component import TrainingExtension
from lorakit.models.supervised_loss import (SupervisedLogits, adapter_token_counts, batch_tokens, logits_loss, per_adapter_loss,
                                supervised_outputs, supervised_tokens)
from lorakit.train.metrics import MetricsLog
from lorakit.train.output import save_result
from lorakit.train.schedule import learning_rate

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
    empty = [name for name, group in zip(names, groups) if not group]
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
          out_dir: str | Path | None = None, eval_examples: Sequence[Example] | None = None,
          resume: str | Path | None = None, overwrite: bool = False, progress: bool = True,
          save: Callable[[Path], None] | None = None, reference: nn.Module | None = None,
          row_adapters: Sequence[str] | None = None, extensions: Sequence[TrainingExtension] = ()) -> TrainResult:
    """Train ``model`` on ``examples``; see the module docstring. ``resume`` is a run directory or checkpoint;
    ``save(out_dir)`` writes the result (default: the adapter in PEFT format, or the full model);
    ``reference`` is the frozen original model a regularizer compares with (default: ``model`` with
    its adapters disabled). ``row_adapters`` names each example's adapter to train several adapters
    in one batch (:func:`lorakit.train.multi.train_adapters`). ``extensions`` are loop hooks beyond
    those ``config`` names (e.g. a mixture's own loss term, such as MeteoRA's task loss)."""
    check_components(config)
    out = Path(out_dir) if out_dir is not None else None
    resume_path = Path(resume) if resume is not None else None
    _prepare_run_dir(out, resume_path, overwrite)
    reuse_freed_memory()
    extensions = [*build_extensions(model, config, reference), *extensions]
    parameters = _trainable(model, config.full)
    chat = use_chat(tokenizer, config.chat)
    encoded = [encode(e, tokenizer, chat=chat, max_length=config.max_length) for e in examples]
    if row_adapters is not None:
        encoded = [dataclasses.replace(e, adapter=name) for e, name in zip(encoded, row_adapters, strict=True)]
    eval_encoded = [encode(e, tokenizer, chat=chat, max_length=config.max_length) for e in eval_examples or []]
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    optimizer = build_optimizer(model, parameters, config)
    start = Resumption(0, Position())
    if resume_path is not None:
        start = load_checkpoint(find_checkpoint(resume_path), model, optimizer, config)
    batches = Batches(encoded, batch_size=config.batch_size, pad_id=pad_id(tokenizer), seed=config.seed,
                      bucket=config.bucket, pack_length=config.max_length if config.pack else None)
    total = config.total_steps(len(batches) * config.batch_size)
    log = MetricsLog(out / METRICS_FILE if out is not None else None)
    clip_groups = adapter_parameter_groups(model, sorted(set(row_adapters))) if row_adapters else [parameters]
    run = _Run(model, optimizer, config, total, batches, start.data, log, out, extensions, clip_groups)
    with compiled_body(model, config.compile):
        train_loss = run.steps_from(start.step, eval_encoded, pad_id(tokenizer), progress)
    for extension in extensions:
        extension.finish()
    eval_loss = mean_loss(model, eval_encoded, batch_size=config.batch_size, pad_id=pad_id(tokenizer)) \
        if eval_encoded else None
    if eval_loss is not None:
        log.write(step=total, eval_loss=eval_loss)
    model.eval()
    if out is not None:
        if save is not None:
            save(out)
        else:
            save_result(model, tokenizer, out, full=config.full)
    return TrainResult(total, train_loss, eval_loss, out, log.records, sum(p.numel() for p in parameters))


class _Run:
    """The state of one run between steps."""

    def __init__(self, model, optimizer, config: TrainConfig, total: int, batches: Batches, data: Position,
                 log: MetricsLog, out: Path | None, extensions: Sequence[TrainingExtension],
                 clip_groups: list[list[nn.Parameter]]) -> None:
        self.model, self.optimizer, self.config, self.extensions = model, optimizer, config, extensions
        self.clip_groups = clip_groups
        """Parameters whose gradient norm is clipped together: all of them, or each adapter's own."""
        self.total, self.log, self.out = total, log, out
        self.batches, self.stream, self.next_data = batches, batches.stream(data), data
        self.warmup = config.warmup_for(total)

    def steps_from(self, first: int, eval_encoded, pad_id: int, progress: bool) -> float:
        """Run steps ``first .. total - 1``; returns the last step's loss."""
        self.model.train()
        bar = tqdm(total=self.total, initial=first, disable=not progress, desc="train", unit="step")
        loss, tokens, started = float("nan"), 0, time.perf_counter()
        for step in range(first, self.total):
            for extension in self.extensions:
                extension.before_step(step, self.total)
            loss, regularization, step_tokens = self._step(step)
            for extension in self.extensions:
                extension.after_step(step, self.total)
            tokens += step_tokens
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
            done = step + 1
            if done % max(1, self.config.log_every) == 0 or done == self.total:
                extra = {"extra_loss": regularization} if self.config.regularizer or regularization else {}
                self.log.write(step=done, loss=loss, **extra, lr=self.optimizer.param_groups[0]["lr"],
                               tokens_per_s=tokens / max(elapsed, 1e-9), elapsed_s=elapsed)
            if self.config.eval_every and done % self.config.eval_every == 0 and eval_encoded and done < self.total:
                self.log.write(step=done, eval_loss=mean_loss(self.model, eval_encoded,
                                                              batch_size=self.config.batch_size, pad_id=pad_id))
                self.model.train()
            if self.out is not None and self.config.save_every and done % self.config.save_every == 0:
                save_checkpoint(self.out, self.model, self.optimizer, Resumption(done, self.next_data), self.config,
                                self.config.keep_checkpoints)
        bar.close()
        return loss

    def _step(self, step: int) -> tuple[float, float, int]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (task loss, regularization, tokens)."""
        lr = learning_rate(step, total=self.total, warmup=self.warmup, peak=self.config.lr,
                           min_ratio=self.config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self._next_batch() for _ in range(self.config.grad_accum)]
        task_loss_of = self._task_loss(batches)
        task_loss, regularization = 0.0, 0.0
        for batch in batches:
            outputs = supervised_outputs(self.model, batch)
            extra = self._extra_loss(batch, outputs) / len(batches)  # first: logits it asks for are reused
            loss = task_loss_of(outputs, batch)
            if not torch.isfinite(loss + extra):
                self._diverged(step, (loss + extra).item())
            (loss + extra).backward()
            task_loss += loss.item()
            regularization += extra.item()
            del outputs  # (M, V) logits: not kept alive through the next micro-batch's forward
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        for group in self.clip_groups:
            norm = torch.nn.utils.clip_grad_norm_(group, max_norm)
            if not torch.isfinite(norm):
                self._diverged(step, float(norm), what="gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return task_loss, regularization, sum(batch_tokens(b) for b in batches)

    @staticmethod
    def _task_loss(batches: list[dict]) -> Callable[[SupervisedLogits, dict], torch.Tensor]:
        """The step's loss of one micro-batch: the sum over supervised tokens divided by the step's token
        count, or, with several adapters in the batch, each adapter's own mean (:func:`per_adapter_loss`)."""
        if "adapter_per_row" in batches[0]:
            counts = adapter_token_counts(batches)
            return lambda outputs, batch: per_adapter_loss(outputs, batch, counts)
        count = max(1, sum(supervised_tokens(b) for b in batches))
        return lambda outputs, batch: logits_loss(outputs) / count

    def _extra_loss(self, batch: dict, outputs: SupervisedLogits) -> torch.Tensor:
        terms = [t for t in (e.loss(batch, outputs) for e in self.extensions) if t is not None]
        return sum(terms, torch.zeros((), device=outputs.device))

    def _next_batch(self) -> dict:
        position, batch = next(self.stream)
        self.next_data = position.following(len(self.batches))
        return batch

    def _diverged(self, step: int, value: float, what: str = "training loss") -> None:
        self.optimizer.zero_grad(set_to_none=True)
        kept = list_checkpoints(self.out) if self.out is not None else []
        where = (f"the last good checkpoint is {kept[-1]} (continue with resume)" if kept
                 else "no checkpoint had been written")
        raise TrainingError(f"the {what} became {value} at step {step + 1}; the run stopped before updating the "
                            f"weights, {where}, and no adapter was written")
