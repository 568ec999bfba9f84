"""Perplexity over plain text: equal to the hand-computed exp(mean NLL) over non-overlapping windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError
from lorakit.eval.corpus_perplexity import corpus_ids, corpus_perplexity
from tests.helpers import char_tokenizer, tiny_llama

DOCUMENTS = ["the cat sat on the mat", "a dog ran far away from home", "birds sing"]


def test_perplexity_is_the_exponent_of_the_mean_nll_over_windows():
    model, tokenizer = tiny_llama(), char_tokenizer()
    ids = corpus_ids(tokenizer, DOCUMENTS)
    assert ids.numel() == sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in DOCUMENTS)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in ids.split(16):  # by hand: every window alone
            logits = model(input_ids=window[None]).logits[0]
            total += float(F.cross_entropy(logits[:-1], window[1:], reduction="sum"))
            count += window.numel() - 1
    result = corpus_perplexity(model, tokenizer, DOCUMENTS, window=16, batch_size=2)
    assert result.tokens == count
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_too_small_a_window_is_refused():
    with pytest.raises(ConfigError, match="window is 1"):
        corpus_perplexity(tiny_llama(), char_tokenizer(), DOCUMENTS, window=1)
