"""Which chunks of a sequence chunk-wise training back-propagates, and with what weights (SeCO and SpaCO: Li et
al., 2025, "Sequential Chunk-wise Optimization for Efficient Long-Context Fine-tuning").

For row ``b`` of a micro-batch and chunk ``i``, ``loss[b, i]`` multiplies the row's loss terms in chunk ``i`` and
``carried[b, i]`` the key/value gradient that chunk ``i`` receives from later chunks (0: the row's chunk is not
back-propagated). A row has ``N`` chunks up to its last one with a loss; later chunks change nothing.

- **SeCO** (no budget): every weight 1, the exact gradient.
- **SpaCO** ``"paper"``: ``K`` of the row's ``N`` chunks drawn uniformly, both weights ``N / K``. Each chunk's
  own loss terms are then unbiased, but a term through ``m`` chunks (loss of chunk ``i`` through the keys and
  values of ``j < i``: ``m = 2``) needs all ``m`` drawn, so its expectation is
  ``(N/K)^m * prod_{t<m} (K - t) / (N - t)`` of the true value: ``N (K - 1) / (K (N - 1))`` for ``m = 2``
  (0 at ``K = 1``).
- **SpaCO** ``"unbiased"``: each chunk drawn on its own with probability ``p = K / N`` (``K`` chunks expected),
  both weights ``1 / p``: a term through ``m`` chunks is weighted ``p^-m`` and drawn with probability ``p^m``,
  so the expected gradient is exactly SeCO's, every cross-chunk term included.

With ``K >= N`` both draws take every chunk with weight 1 (SeCO). The draw of a micro-batch is a pure function
of the run's seed, the step and the micro-batch's index in the step, so resumed and multi-process runs draw the
same chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.config import SPARSE_CHUNK_ESTIMATORS
from lorakit.errors import ConfigError


@dataclass(frozen=True)
class ChunkWeights:
    """``loss`` and ``carried``: ``(B, N)`` float64 weights (module docstring)."""

    loss: torch.Tensor
    carried: torch.Tensor

    def trained(self, chunk: int) -> bool:
        """Whether any row back-propagates ``chunk``."""
        return bool((self.loss[:, chunk] != 0).any() or (self.carried[:, chunk] != 0).any())


@dataclass(frozen=True)
class SparseChunks:
    """SpaCO's draw: ``budget`` chunks per sequence, by ``estimator`` (one of ``SPARSE_CHUNK_ESTIMATORS``)."""

    budget: int
    estimator: str = "paper"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, int) and self.budget >= 1):
            raise ConfigError(f"sparse_chunks must be a positive number of chunks per sequence, got {self.budget!r}")
        if self.estimator not in SPARSE_CHUNK_ESTIMATORS:
            raise ConfigError(f"sparse_chunk_estimator={self.estimator!r} is invalid: one of "
                              f"{', '.join(SPARSE_CHUNK_ESTIMATORS)}")

    def generator(self, step: int, micro_batch: int) -> torch.Generator:
        """The draw's generator for micro-batch ``micro_batch`` (over all ranks) of step ``step``."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + micro_batch)


def chunk_weights(chunks_per_row: list[int], chunks: int, sparse: SparseChunks | None = None,
                  generator: torch.Generator | None = None) -> ChunkWeights:
    """The weights of rows with ``chunks_per_row`` chunks each, padded with zeros to ``chunks`` columns: SeCO's
    ones, or SpaCO's draw from ``generator``."""
    loss = torch.zeros(len(chunks_per_row), chunks, dtype=torch.float64)
    for row, count in enumerate(chunks_per_row):
        if sparse is None or sparse.budget >= count:
            loss[row, :count] = 1.0
        elif sparse.estimator == "paper":
            loss[row, torch.randperm(count, generator=generator)[:sparse.budget]] = count / sparse.budget
        else:
            drawn = torch.rand(count, generator=generator, dtype=torch.float64) < sparse.budget / count
            loss[row, :count][drawn] = count / sparse.budget
    return ChunkWeights(loss=loss, carried=loss.clone())
