"""``--fsdp``: the model sharded across the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``), for bases
that do not fit one device.

Each decoder block (the classes a Hugging Face model names in ``_no_split_modules``) is one FSDP unit, the rest
of the model (embeddings, final norm, output head: tied weights stay in one unit) the root unit. Every
parameter, frozen or trainable, is split along its first dimension over the ranks (FSDP2 shards per parameter,
so a block's frozen base and its trainable adapter mix freely); a unit's parameters are gathered for its forward
and its backward and freed after. Gradients are reduce-scattered as sums (divide factor 1: the loss is already
divided by the tokens of every rank, :mod:`lorakit.train.distributed`), only after the rank's last micro-batch,
and a parameter no token reached on a rank still takes part. Saves gather the full trainable tensors
(:func:`full_parameters`); a checkpoint holds full tensors, so it resumes with or without ``--fsdp``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor, init_device_mesh

from lorakit.errors import ConfigError
from lorakit.train.distributed import current_ranks


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules whose class the model lists in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError(f"--fsdp shards a model block by block, and {type(model).__name__} names no blocks "
                          "(_no_split_modules); train it without --fsdp")
    return blocks


def shard_model(model: nn.Module) -> None:
    """Shard ``model`` across the process group's ranks (module docstring); refused outside a process group."""
    ranks = current_ranks()
    if not ranks.distributed:
        raise ConfigError("--fsdp shards the model across torchrun's ranks; launch with torchrun or --nproc N")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (ranks.world,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
            module.set_reduce_scatter_unused_params(True, recurse=False)


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_model` sharded ``model``."""
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (only the rank's last micro-batch of a step)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a sharded one gathered from every rank (every rank must call it, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shaped_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` sharded as ``reference`` is (a plain ``reference``: ``full`` itself)."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements)
    return full


@contextmanager
def full_parameters(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block, each of ``parameters`` that is sharded is a whole plain parameter in its module (for
    saving: every rank gathers, any may read); afterwards the sharded ones are back."""
    wanted = {id(p) for p in parameters if isinstance(p, DTensor)}
    swapped = []
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in wanted:
                module._parameters[name] = nn.Parameter(parameter.full_tensor(), parameter.requires_grad)
                swapped.append((module, name, parameter))
    try:
        yield
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def local_parameter_bytes(model: nn.Module) -> int:
    """The bytes of the parameters this rank holds: its shards of a sharded model's, every one of another's."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over plain or sharded gradients: the total norm over every rank's shards."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = full_tensor(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
