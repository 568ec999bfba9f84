"""The empirical Fisher of every target weight, which weights LQ-LoRA's decomposition (Guo et al., ICLR 2024,
Sec. 3.3): ``F_l = sum_k (dL_k / dW_l)^2`` over examples ``k``, one per batch (batch size 1), with ``L_k`` the
mean next-token cross-entropy over the supervised tokens of example ``k``.

Each weight's gradient is squared into a float64 sum on the CPU as soon as autograd has accumulated it,
then freed (the hooks of LoRA-GA's gradient estimate, :mod:`lorakit.init.lora_ga.gradients`); flags,
earlier gradients and the train/eval mode are restored afterwards. Under ``torch.distributed`` each rank passes
its share of the examples and the sums are added over the ranks, as LoRA-GA's are (float64: the order of the
additions does not change the fp32 result).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import DataError
from lorakit.init.lora_ga.gradients import backward_each, collecting_gradients, gradient_targets
from lorakit.parallel.process_group import sum_across_ranks


def estimate_fisher(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *,
                    targets: LoraConfig | Sequence[str], progress: bool = True) -> dict[str, torch.Tensor]:
    """The summed squared gradients (d_out, d_in), fp32 on the CPU, of every weight ``targets`` names.

    ``batches`` are collated LM batches of one example each; one without supervised tokens is skipped.
    Run it on the plain model, before :func:`lorakit.attach`."""
    bases = gradient_targets(model, targets)
    sums = {name: torch.zeros(base.weight.shape, dtype=torch.float64) for name, base in bases.items()}
    owners = {id(base.weight): name for name, base in bases.items()}

    def collect(weight: torch.Tensor) -> None:  # runs once autograd has accumulated weight.grad
        sums[owners[id(weight)]].add_(weight.grad.detach().to("cpu", torch.float64).square())
        weight.grad = None

    with collecting_gradients(model, [base.weight for base in bases.values()], collect):
        count = backward_each(model, batches, progress, "lq-lora fisher", "example")
    if sum_across_ranks(torch.tensor([count])).item() == 0:
        raise DataError("no example with supervised tokens to estimate the Fisher from")
    return {name: sum_across_ranks(total).float() for name, total in sums.items()}
