"""``--fsdp``: the model sharded across the ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``), for bases
that do not fit one device.

Each decoder block (the classes a Hugging Face model names in ``_no_split_modules``) is one FSDP unit; so are the
input embeddings and the output head when their weights are not tied (each is gathered only for its own forward
and backward: the root unit stays gathered for the whole step); the rest (the final norm, and tied embeddings) is
the root unit. Every
parameter, frozen or trainable, is split along its first dimension over the ranks (FSDP2 shards per parameter,
so a block's frozen base and its trainable adapter mix freely); a unit's parameters are gathered for its forward
and its backward and freed after. Gradients are reduce-scattered as sums (divide factor 1: the loss is already
divided by the tokens of every rank, :mod:`lorakit.train.distributed`), only after the rank's last micro-batch,
and a parameter no token reached on a rank still takes part. Saves gather the full trainable tensors
(:func:`full_parameters`); a checkpoint holds full tensors, the same files as without ``--fsdp``.

So that a rank never holds the whole base, :func:`load_skeleton` builds the model with its weights on the meta
device (the adapter's factors are drawn for real, as on a loaded base), and :func:`shard_and_fill` shards it,
allocates each rank's shards and fills them from the checkpoint one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor, init_device_mesh
from transformers import AutoConfig

from lorakit.errors import ConfigError, ModelError
from lorakit.io.streamed_tensors import stream_tensors
from lorakit.models.load import finish_loading, load_tokenizer
from lorakit.models.skeleton import causal_lm_skeleton
from lorakit.parallel.process_group import current_ranks
from lorakit.quant.quantized_loading import local_source, weight_files


def decoder_blocks(model: nn.Module, flag: str = "--fsdp") -> list[nn.Module]:
    """The model's repeated blocks: the modules whose class (or a base class: FSDP2 subclasses what it shards) a
    Hugging Face model inside ``model`` lists in ``_no_split_modules``; ``flag`` names the option that needs them
    when there are none."""
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    blocks = [module for module in model.modules() if any(cls.__name__ in names for cls in type(module).__mro__)]
    if not blocks:
        raise ConfigError(f"{flag} works block by block, and {type(model).__name__} names no blocks "
                          f"(_no_split_modules); train it without {flag}")
    return blocks


def shard_model(model: nn.Module) -> None:
    """Shard ``model`` across the process group's ranks (module docstring); refused outside a process group."""
    ranks = current_ranks()
    if not ranks.distributed:
        raise ConfigError("--fsdp shards the model across torchrun's ranks; launch with torchrun or --nproc N")
    mesh = init_device_mesh(_device_type(), (ranks.world,))
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and head is not None and getattr(head, "weight", None) is not embeddings.weight:
        fully_shard(embeddings, mesh=mesh)
        fully_shard(head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
            module.set_reduce_scatter_unused_params(True, recurse=False)


def load_skeleton(name_or_path: str) -> tuple[nn.Module, object, list[Path]]:
    """The model ``name_or_path`` names with its parameters on the meta device, its tokenizer and its weight files
    (to fill after sharding: :func:`shard_and_fill`)."""
    source = local_source(name_or_path, "--fsdp (it reads the weights shard by shard)")
    model = causal_lm_skeleton(AutoConfig.from_pretrained(source))
    model, tokenizer = finish_loading(model, load_tokenizer(source, name_or_path), source)
    return model, tokenizer, weight_files(Path(source))


@torch.no_grad()
def shard_and_fill(model: nn.Module, files: Sequence[Path]) -> None:
    """Shard the skeleton ``model`` (:func:`shard_model`), allocate this rank's shards and fill them: the meta
    parameters from ``files`` (a base weight wrapped by an adapter layer is ``<module>.base_layer.weight`` in the
    model, ``<module>.weight`` in the checkpoint), the real ones (the adapter's factors) and every buffer (rotary
    frequencies, computed by the constructors) from their values before sharding."""
    real = {name: p.detach().clone() for name, p in model.named_parameters() if p.device.type != "meta"}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to("meta")
    shard_model(model)
    model.to_empty(device=_device_type())
    parameters = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    for name, value in real.items():
        parameters[name].copy_(shaped_like(value, parameters[name]))
    by_key = {name.replace(".base_layer.", "."): name for name in parameters if name not in real}
    missing = set(by_key)
    for file in files:
        for key, tensor in stream_tensors(file):
            if key in by_key:
                parameters[by_key[key]].copy_(shaped_like(tensor, parameters[by_key[key]]))
                missing.discard(key)
    if missing:
        raise ModelError(f"the checkpoint lacks {len(missing)} parameter(s) of {type(model).__name__}, e.g. "
                         f"{sorted(missing)[:3]}: it is incomplete or belongs to another model")


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
    """``full`` sharded as ``reference`` is (a plain ``reference``: ``full`` itself). Every rank holds ``full`` (read
    from the same file), so each takes its own part without communication."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements,
                                 src_data_rank=None)
    return full


def _device_type() -> str:
    """Where the shards live: the GPU when there is one (NCCL), else the CPU (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
