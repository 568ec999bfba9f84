"""Perplexity of a causal language model over plain text, scored in non-overlapping windows.

The documents are tokenized, joined with the end-of-sequence token between them and cut into windows of
``window`` tokens (the last one shorter); each window is scored on its own, its first token context only::

    perplexity = exp( sum over predicted tokens of -log p(t_i | the earlier tokens of its window) / N )

with ``N`` the number of predicted tokens (every token but each window's first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.errors import ConfigError


@dataclass(frozen=True)
class CorpusPerplexity:
    """The corpus's perplexity, its mean negative log-likelihood per predicted token, and how many there were."""

    perplexity: float
    nll: float
    tokens: int


def corpus_ids(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """The documents' token ids, joined by the end-of-sequence token: (T,) int64."""
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False).input_ids + separator
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def corpus_perplexity(model: nn.Module, tokenizer: Any, documents: Sequence[str], *, window: int = 512,
                      batch_size: int = 4, progress: bool = False) -> CorpusPerplexity:
    """:class:`CorpusPerplexity` of ``model`` on ``documents`` (module docstring), ``batch_size`` windows a forward."""
    if window < 2:
        raise ConfigError(f"window is {window}; at least 2 tokens are needed to predict one")
    ids = corpus_ids(tokenizer, documents)
    if ids.numel() < 2:
        raise ConfigError("the documents hold fewer than 2 tokens; there is nothing to predict")
    device = next(model.parameters()).device
    windows = list(ids.split(window))  # each (window,), the last maybe shorter
    full, short = (windows, []) if windows[-1].numel() == window else (windows[:-1], [windows[-1:]])
    batches = [full[start:start + batch_size] for start in range(0, len(full), batch_size)] + short
    total, count = 0.0, 0
    for batch in tqdm(batches, disable=not progress, desc="perplexity", unit="batch"):
        inputs = torch.stack(batch).to(device)  # (b, w)
        logits = model(input_ids=inputs).logits.float()  # (b, w, V)
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs[:, 1:].flatten(), reduction="sum"))
        count += inputs[:, 1:].numel()
    nll = total / count
    return CorpusPerplexity(perplexity=math.exp(nll), nll=nll, tokens=count)
