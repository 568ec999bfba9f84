"""Data-parallel training on PyTorch's own distributed engine: processes launched by ``torchrun``, a
``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA), gradients summed with ``all_reduce``.

How a step is split so that N ranks train the adapter one process would. A run of micro-batch size ``b`` and
accumulation ``k`` on N ranks takes ``k N`` micro-batches per optimizer step from the one data order a single
process uses (:class:`~lorakit.data.batching.Batches`): rank ``r`` takes micro-batches ``r k .. r k + k - 1`` of
each step, the global batch is ``b k N``. The loss is the step's summed token loss divided by the supervised
tokens of all ranks (one ``all_reduce`` of the count), so rows of different lengths weigh what they weigh in one
process; after the rank's last micro-batch, one ``all_reduce`` sums every trainable gradient (none on the inner
micro-batches). Every rank then holds the same gradient, clips it alike and takes the same optimizer step. So
``torchrun --nproc_per_node N`` with ``--grad-accum k`` equals one process with ``--grad-accum k N``.

Why not ``DistributedDataParallel``'s wrapper: lorakit's fused loss runs the decoder body and the output head
apart (never the wrapped module's ``forward``), training components run forwards of their own, and MixLoRA's
experts may see no token on a rank; summing the gradients after the backward is the same reduction for all of
them. (A LoRA's gradients are small, so overlapping their reduction with the backward would gain little.)
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import ConfigError
from lorakit.parallel.process_group import collective_device, current_ranks, sum_across_ranks

DEFAULT_TIMEOUT_S = 300.0
"""How long a collective waits for the other ranks before the run fails (a rank that died or hangs)."""
BUCKET_NUMBERS = 1 << 22
"""Gradient values all-reduced in one flat buffer (16 MiB of fp32)."""


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process as one of several ranks (it sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group ``torchrun`` describes in the environment (gloo on the CPU, NCCL when CUDA is
    there, one GPU per local rank); a lone process, or one whose group is up already, changes nothing. Returns
    whether it started the group (whoever starts it stops it)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    if not timeout_s > 0:
        raise ConfigError(f"the distributed timeout must be a positive number of seconds, got {timeout_s!r}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def stop_process_group(*, finished: bool = True) -> None:
    """Leave the process group, if this process is in one. A rank that ``finished`` first waits for the others to
    finish too, so that none tears its connections down while another still uses them (gloo aborts the process
    then); a failing rank leaves at once (the others may never reach the barrier). What the run left unreachable
    (sharded modules, DTensors: they refer to the group) is freed first, while the group is still there, not at
    the interpreter's exit after it (a gloo rank that ran many commands aborted once there, 1 run in ~30)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def sum_gradients(parameters: Sequence[nn.Parameter]) -> int:
    """Replace each parameter's gradient by its sum over the ranks; returns the bytes all-reduced. A parameter no
    rank has a gradient for keeps none (so the optimizer skips it, as one process would); one that only some
    ranks have a gradient for (a MixLoRA expert no token reached on a rank) counts the others' as zeros."""
    if not current_ranks().distributed:
        return 0
    has_grad = sum_across_ranks(torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32))
    reduced = [p for p, count in zip(parameters, has_grad.tolist(), strict=True) if count]
    for parameter in reduced:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    sent = 0
    for bucket in _buckets(reduced):
        grads = [p.grad for p in bucket]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(collective_device())
        dist.all_reduce(flat)
        sent += flat.numel() * flat.element_size()
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))
    return sent


def gathered_rng_states() -> list[torch.Tensor]:
    """Every rank's torch generator state, in rank order (a lone process: its own)."""
    state = torch.get_rng_state()
    ranks = current_ranks()
    if not ranks.distributed:
        return [state]
    device = collective_device()
    states = [torch.empty_like(state, device=device) for _ in range(ranks.world)]
    dist.all_gather(states, state.to(device))
    return [s.cpu() for s in states]


def barrier() -> None:
    """Wait for every rank (a lone process: return)."""
    if current_ranks().distributed:
        dist.barrier()


def _buckets(parameters: Sequence[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Consecutive groups of the same dtype and device holding about :data:`BUCKET_NUMBERS` values each."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for parameter in parameters:
        last = buckets[-1] if buckets else None
        if last is None or size + parameter.numel() > BUCKET_NUMBERS or (
                last[0].dtype, last[0].device) != (parameter.dtype, parameter.device):
            buckets.append([])
            size = 0
        buckets[-1].append(parameter)
        size += parameter.numel()
    return buckets
