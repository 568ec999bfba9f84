"""LoRAM's alignment: a short continued pre-training of the pruned model on plain text, before LoRA training.

Pruning moves the pruned model's hidden states away from the full model's; a brief full-parameter language-model
training on general text pulls the pruned weights back into agreement, so an adapter trained on them transfers
better to the full model (Zhang et al., ICLR'25, arXiv 2502.13533, Sec. 3.2: lr 5e-5, sequences of 512; the model
publisher does it once). Here the text is the offline English corpus (:mod:`lorakit.data.offline_corpus`):
its documents are tokenized, joined with the end-of-sequence token, cut into windows of ``window`` tokens, and
each step trains AdamW on ``batch_size`` consecutive windows (wrapping around), the mean next-token
cross-entropy of every position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.modes import module_mode
from lorakit.errors import DataError


def corpus_windows(tokenizer, documents: Sequence[str], window: int) -> torch.Tensor:
    """The documents' tokens, each followed by EOS, cut into whole windows: (n_windows, window)."""
    eos = tokenizer.eos_token_id
    ids = [t for doc in documents for t in (*tokenizer(doc, add_special_tokens=False)["input_ids"], eos)]
    count = len(ids) // window
    if count == 0:
        raise DataError(f"the alignment corpus holds {len(ids)} tokens, less than one window of {window}")
    return torch.tensor(ids[: count * window]).view(count, window)


def align_pruned(model: nn.Module, tokenizer, documents: Sequence[str], *, steps: int, lr: float = 5e-5,
                 window: int = 256, batch_size: int = 4, progress: bool = False) -> list[float]:
    """Train every weight of ``model`` for ``steps`` steps on ``documents`` (module docstring); the model's
    ``requires_grad`` flags and mode are restored. Returns the loss of each step."""
    windows = corpus_windows(tokenizer, documents, window)
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in parameters]
    losses = []
    try:
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        device = next(model.parameters()).device
        with module_mode(model, training=True), torch.enable_grad():
            for step in tqdm(range(steps), disable=not progress, desc="loram alignment", unit="step"):
                rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(windows)
                ids = windows[rows].to(device)
                loss = model(input_ids=ids, labels=ids).loss
                if not torch.isfinite(loss):
                    raise DataError(f"the alignment loss is {loss.item()} at step {step}; lower --loram-align-lr")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)
    return losses
