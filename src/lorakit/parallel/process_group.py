"""Where this process stands among the ranks of a ``torch.distributed`` run, and the few collectives everything
above it shares (the trainer's gradient sums, the data-driven inits' combined estimates).

A lone process (no process group, or a group of one) is :data:`LONE`, and every function here then returns its
input unchanged without touching ``torch.distributed``. Collectives run on the process group's device (the local
GPU under NCCL, else the CPU) and hand their results back where the inputs were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and draws its progress bars (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether other ranks take part."""
        return self.world > 1

    def share(self, items: Sequence) -> list:
        """This rank's share of ``items``, which every rank holds alike: items ``rank, rank + world, ...``, so that
        step ``t`` of the ranks together covers items ``t world .. t world + world - 1`` in order."""
        return list(items[self.rank::self.world])


LONE = Ranks()
"""A process running alone."""


def current_ranks() -> Ranks:
    """The process group's ranks, or :data:`LONE`."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return LONE


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: the local GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks (a lone process: ``values``); floating point is summed in float64 and
    returned in ``values``' dtype, on its device."""
    if not current_ranks().distributed:
        return values
    summed = values.detach().to(collective_device(), torch.float64 if values.is_floating_point() else values.dtype)
    dist.all_reduce(summed)
    return summed.to(values.device, values.dtype)


def gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``rows`` (n_r, d), in rank order, on ``rows``' device; ranks may hold different row counts
    (zero included) but must agree on ``d`` and the dtype. A lone process gets ``[rows]``."""
    ranks = current_ranks()
    if not ranks.distributed:
        return [rows]
    device = collective_device()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(ranks.world)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], dtype=torch.int64, device=device))
    sizes = [int(count.item()) for count in counts]
    padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype, device=device)  # (max n_r, d)
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(gathered, padded)
    return [part[:size].to(rows.device) for part, size in zip(gathered, sizes, strict=True)]
