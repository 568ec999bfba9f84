"""Each row's next token, by that row's own settings and random generator, and its log-probabilities.

Greedy rows take ``argmax`` (the same token ``generate`` picks). A sampled row draws from
``softmax(logits / T)`` restricted to the smallest set of most likely tokens whose probability reaches
``top_p``, with a ``torch.Generator`` of its own: seeded from the request, its draws do not depend on
which other rows share the batch, so a seeded request gives the same text alone and under load.
Log-probabilities are the model's own, ``log_softmax(logits)``, before temperature and top-p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.serve.requests import Sampling, TokenLogprob


def row_generator(sampling: Sampling, choice: int, device: torch.device) -> torch.Generator | None:
    """A generator for choice ``choice`` of a sampled request (``seed + choice``; a random seed without one)."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed + choice)
    return generator


def next_tokens(logits: torch.Tensor, settings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of each row of ``logits`` ``(B, V)``."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (sampling, generator) in enumerate(zip(settings, generators, strict=True)):
        if not sampling.greedy:
            chosen[row] = _sample(logits[row], sampling, generator)
    return chosen


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One draw from ``softmax(logits / T)`` cut to its top-``p`` nucleus."""
    probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = probabilities.sort(descending=True)
        before = ordered.cumsum(dim=-1) - ordered  # mass of the more likely tokens
        ordered = ordered.masked_fill(before >= sampling.top_p, 0.0)  # keep the smallest set reaching top_p
        probabilities = torch.zeros_like(probabilities).scatter_(0, order, ordered)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its ``top`` most likely alternatives; ``logits`` (B, V)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if top:
        values, indices = logprobs.topk(top, dim=-1)
        alternatives = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        alternatives = [()] * len(tokens)
    return [TokenLogprob(token, logprob, alts) for token, logprob, alts in
            zip(tokens, chosen, alternatives, strict=True)]
