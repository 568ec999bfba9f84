"""The layer inputs EVA looks at: which tokens count, how they are tapped, which layers share them.

A token counts when its ``attention_mask`` is 1 and, with the label mask, its own label (same
position, PEFT's rule) is not ``-100``; a layer's input ``(B, T, d)`` becomes the rows ``(N, d)`` of
the counted tokens. Layers that receive the very same input tensor (q/k/v after one norm, gate/up in a
Llama MLP) are found by hashing their inputs on one batch and then share one PCA (PEFT's HashHook). Under
torch.distributed every rank's rows of one step are gathered to every rank (PEFT's ``gather_distributed_inputs``),
so that each folds all of them in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.data.encoding import IGNORE_INDEX
from lorakit.errors import DataError, TargetError
from lorakit.parallel.process_group import current_ranks, gather_rows


def token_mask(batch: Mapping[str, torch.Tensor], use_label_mask: bool) -> torch.Tensor | None:
    """The ``(B, T)`` mask of the tokens EVA uses, or ``None`` for every token (no mask, no labels)."""
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.bool()
    labels = batch.get("labels")
    if use_label_mask and labels is not None:
        supervised = labels != IGNORE_INDEX
        mask = supervised if mask is None else mask & supervised.to(mask.device)
    return mask


def select_tokens(x: torch.Tensor, mask: torch.Tensor | None, module_name: str) -> torch.Tensor:
    """The rows ``(N, d)`` of the input ``x`` (..., d) at the masked positions."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if tuple(x.shape[:-1]) != tuple(mask.shape):
        raise DataError(f"the input of module {module_name!r} has shape {tuple(x.shape)}, which does not line up "
                        f"with the batch's token mask {tuple(mask.shape)}; EVA needs (batch, tokens, features) inputs")
    return x[mask.to(x.device)]


@contextmanager
def taps(model: nn.Module, names: Sequence[str], on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Inside the block, every call of module ``name`` first passes its input to ``on_input(name, x)``.

    The hooks are removed when the block ends, also when a forward pass raises."""
    handles = []
    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(_tap(name, on_input), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tap(name: str, on_input: Callable[[str, torch.Tensor], None]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        on_input(name, x.detach())
    return hook


def digest(x: torch.Tensor) -> str:
    """A hash of a tensor's shape, dtype and bytes: equal for equal inputs (PEFT compares a hash too)."""
    data = x.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(f"{tuple(x.shape)}{x.dtype}".encode() + data.tobytes(), digest_size=16).hexdigest()


def input_groups(model: nn.Module, names: Sequence[str], forward: Callable[[], None]) -> dict[str, str]:
    """Each module's representative: the first module (in ``names`` order) whose input in one forward
    pass equals its own. A module the forward pass never calls is an error naming it."""
    digests: dict[str, str] = {}

    def record(name: str, x: torch.Tensor) -> None:
        digests.setdefault(name, digest(x))

    with taps(model, names, record):
        forward()
    unused = [name for name in names if name not in digests]
    if unused:
        raise TargetError(f"module {unused[0]!r} was not called by the model's forward pass, so EVA sees no input "
                          "for it; leave it out of the targets")
    first: dict[str, str] = {}
    return {name: first.setdefault(digests[name], name) for name in names}


def gathered_inputs(inputs: Mapping[str, torch.Tensor] | None, widths: Mapping[str, int],
                    device: torch.device) -> list[dict[str, torch.Tensor] | None]:
    """Every rank's rows (n_r, d) of one step for each module in ``widths`` (module name -> d), in rank order;
    ``None`` for a rank that had no batch (``inputs`` None). Every rank must pass the same modules in the same order.
    A lone process gets ``[inputs]``."""
    if not current_ranks().distributed:
        return [None if inputs is None else dict(inputs)]
    present = [bool(flag.item()) for flag in gather_rows(torch.tensor([[int(inputs is not None)]], device=device))]
    per_module = {name: gather_rows(torch.zeros(0, width, device=device) if inputs is None else inputs[name])
                  for name, width in widths.items()}
    return [{name: rows[rank] for name, rows in per_module.items()} if here else None
            for rank, here in enumerate(present)]
