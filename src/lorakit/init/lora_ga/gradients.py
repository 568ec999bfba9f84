"""Step 1 of LoRA-GA: the average full-weight gradient of the task loss, per target weight.

``G_l = (1/N) sum_k dL_k/dW_l``, where ``L_k`` is the mean next-token cross-entropy over the supervised
tokens of batch ``k`` (Wang, Yu, Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv 2407.05000, Sec. 3). Only the target weights require a gradient while the batches run; each
weight's gradient is added to a float64 sum on the CPU the moment autograd has accumulated it and is then
freed, so the accelerator holds about one weight's gradient at a time, never all of them (the CPU holds
the sums: 8 bytes per target weight).

Under ``torch.distributed`` each rank passes its own share of the batches (``Ranks.share``: batches ``r, r + N,
...``) and the sums and counts are added over the ranks, so every rank gets the average over all of them and
initialises identically. Summing a few fp32 gradients in float64 is exact unless their magnitudes differ by more
than about 2^28, so the average, rounded to fp32 once at the end, is the one a lone process computes from all the
batches, whichever rank summed which (LoRA-GA's SVD is sensitive enough to notice a change of summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.config import LoraConfig
from lorakit.core.inject import find_targets
from lorakit.core.kinds import Conv1DKind, LinearKind, kind_of
from lorakit.core.layer import LoraLayer
from lorakit.core.modes import module_mode
from lorakit.errors import DataError, FormatError, TargetError
from lorakit.io.files import load_metadata, load_tensors, save_tensors
from lorakit.models.supervised_loss import summed_loss, supervised_tokens
from lorakit.parallel.process_group import sum_across_ranks

_BATCHES_KEY = "num_batches"


class GradientEstimate(Mapping[str, torch.Tensor]):
    """Averaged weight gradients by module name, each (d_out, d_in) like ``nn.Linear.weight``, fp32 on CPU.

    A plain value: pass it to :func:`~lorakit.init.lora_ga.lora_ga_init.init_lora_ga`, or ``save`` it and ``load`` it
    in another process (safetensors; the number of batches goes into the file's metadata)."""

    def __init__(self, grads: Mapping[str, torch.Tensor], num_batches: int) -> None:
        self.grads = dict(grads)
        self.num_batches = num_batches

    def __getitem__(self, module_name: str) -> torch.Tensor:
        return self.grads[module_name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.grads)

    def __len__(self) -> int:
        return len(self.grads)

    def __repr__(self) -> str:
        return f"GradientEstimate({len(self.grads)} modules, num_batches={self.num_batches})"

    def save(self, path: str | Path) -> Path:
        """Write the estimate to the safetensors file ``path`` (atomically); returns the path."""
        path = Path(path)
        save_tensors(path, self.grads, metadata={_BATCHES_KEY: str(self.num_batches)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> GradientEstimate:
        """Read an estimate written by :meth:`save`; a :class:`FormatError` names a foreign or broken file."""
        path = Path(path)
        grads = load_tensors(path)
        count = load_metadata(path).get(_BATCHES_KEY)
        if count is None or not count.isdigit() or int(count) < 1:
            raise FormatError(f"{path}: not a lorakit gradient estimate (metadata {_BATCHES_KEY!r} is {count!r})")
        for name, grad in grads.items():
            if grad.dim() != 2 or not grad.is_floating_point():
                raise FormatError(f"{path}: gradient {name!r} has shape {tuple(grad.shape)} and dtype {grad.dtype}; "
                                  "a floating-point (d_out, d_in) matrix is required")
        return cls(grads, int(count))


def gradient_targets(model: nn.Module, targets: LoraConfig | Sequence[str]) -> dict[str, nn.Module]:
    """The base layers whose weight gradients LoRA-GA needs, by module name (Linear and Conv1D only).

    ``targets`` is the adapter's :class:`LoraConfig` (matched as :func:`lorakit.attach` will match it) or
    a list of full module names. Wrapped layers count as their base layer, so this works after attach."""
    names = find_targets(model, targets) if isinstance(targets, LoraConfig) else _named(model, targets)
    bases = {}
    for name in names:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not isinstance(kind_of(base, name), LinearKind):
            raise TargetError(f"LoRA-GA initialises Linear and Conv1D layers only; module {name!r} is an "
                              f"{type(base).__name__}: leave it out of the targets")
        bases[name] = base
    return bases


def _named(model: nn.Module, names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not names:
        raise TargetError(f"targets={names!r}: a LoraConfig or a non-empty list of full module names is required")
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise TargetError(f"module {unknown[0]!r} is not in {type(model).__name__}; pass full module names "
                          "such as 'model.layers.0.self_attn.q_proj', or the adapter's LoraConfig")
    return list(names)


def estimate_gradients(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *,
                       targets: LoraConfig | Sequence[str], progress: bool = True) -> GradientEstimate:
    """Average ``dL/dW`` over ``batches`` for every weight ``targets`` names; see the module docstring.

    ``batches`` are collated LM batches (``input_ids``, ``labels``, and ``attention_mask`` or
    ``position_ids``); a batch without supervised tokens is skipped. Run it on the plain model, before
    :func:`lorakit.attach`. Every ``requires_grad`` flag, the earlier ``.grad`` of the target weights
    and the train/eval mode are restored afterwards, also when a batch fails."""
    bases = gradient_targets(model, targets)
    sums: dict[str, torch.Tensor | None] = {name: None for name in bases}
    owners = {id(base.weight): name for name, base in bases.items()}

    def collect(weight: torch.Tensor) -> None:  # runs once autograd has accumulated weight.grad
        name = owners[id(weight)]
        grad = weight.grad.detach().to("cpu", torch.float64)
        sums[name] = grad if sums[name] is None else sums[name].add_(grad)
        weight.grad = None

    with collecting_gradients(model, [base.weight for base in bases.values()], collect):
        count = backward_each(model, batches, progress, "lora-ga gradients", "batch")
    return _average(sums, count, bases)


def backward_each(model: nn.Module, batches: Iterable[dict], progress: bool, desc: str, unit: str) -> int:
    """Back-propagate each batch's mean supervised loss (skipping a batch without supervised tokens), with
    autograd on; the number of batches that counted."""
    count = 0
    with torch.enable_grad():
        for batch in tqdm(batches, disable=not progress, desc=desc, unit=unit):
            tokens = supervised_tokens(batch)
            if tokens:
                (summed_loss(model, batch) / tokens).backward()
                count += 1
    return count


@contextmanager
def collecting_gradients(model: nn.Module, weights: list[nn.Parameter],
                collect: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Train mode with only ``weights`` requiring a gradient, each handed to ``collect`` as soon as it is
    accumulated; every flag, the weights' earlier ``.grad`` and the mode are restored in ``finally``."""
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_grads = [(weight, weight.grad) for weight in weights]
    hooks = []
    try:
        for parameter, _ in saved_flags:
            parameter.requires_grad_(False)
        for weight in weights:
            weight.grad = None
            weight.requires_grad_(True)
            hooks.append(weight.register_post_accumulate_grad_hook(collect))
        with module_mode(model, training=True):
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, flag in saved_flags:
            parameter.requires_grad_(flag)
        for weight, grad in saved_grads:
            weight.grad = grad


def _average(sums: dict[str, torch.Tensor | None], count: int, bases: dict[str, nn.Module]) -> GradientEstimate:
    """``sum / count`` over every rank's batches (module docstring), fp32, in the (d_out, d_in) layout.

    A weight no batch reached (not on the loss path) has gradient zero."""
    count = int(sum_across_ranks(torch.tensor([count])).item())
    if count == 0:
        raise DataError("no batch with supervised tokens to estimate LoRA-GA gradients from")
    grads = {}
    for name, total in sums.items():  # every rank adds the same names in the same order
        total = torch.zeros(bases[name].weight.shape, dtype=torch.float64) if total is None else total
        grad = (sum_across_ranks(total) / count).float()
        grads[name] = grad.T.contiguous() if isinstance(kind_of(bases[name], name), Conv1DKind) else grad
    return GradientEstimate(grads, count)
