"""Training with the model's decoder body compiled by ``torch.compile`` (``TrainConfig.compile``).

Only the body's ``forward`` is compiled (inductor fuses the normalisations, activations, rotary
embeddings and the adapters' small products around the GEMMs); the output head and the fused
cross-entropy (:mod:`lorakit.models.head_loss`) stay eager. lorakit's routing is read inside the
compiled code, and a change of it (another adapter, a mixed batch) recompiles instead of running
stale code. On the default model and a 2-core CPU the compiled step reached the same share of the
matmul peak as eager (70% vs 69%) with 17% less peak memory, after about three minutes of compilation
(docs/results/performance.md); GPUs, where eager elementwise kernels cost more, gain more. The numbers
differ from eager execution by the rounding of fused kernels, so a resumed run keeps the setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.train.wrapped_forward import wrapped_forwards


@contextlib.contextmanager
def compiled_body(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``model.base_model`` (or ``model`` itself when it has no separate body) runs its
    ``forward`` compiled; afterwards the module's own ``forward`` is back as it was, including one set on the
    instance by someone else (evaluation and generation outside training run eagerly, with no
    recompilation for their shapes)."""
    if not enabled:
        yield
        return
    with wrapped_forwards([getattr(model, "base_model", model)], torch.compile):
        yield
