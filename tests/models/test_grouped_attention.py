"""Grouped-query attention over un-repeated keys and values (chunk-wise training's): transformers' SDPA attention's
numbers, one folded mask per forward shared by every layer, and the model's attention restored afterwards."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lorakit.models.grouped_attention import GROUPED_SDPA, grouped_query_attention, grouped_sdpa_forward
from tests.helpers import tiny_llama, token_batch


class _Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_grouped_attention_is_sdpa_attention_without_repeated_heads():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 5, 8, generator=generator, dtype=torch.float64)   # 6 query heads
    key, value = (torch.randn(2, 2, 11, 8, generator=generator, dtype=torch.float64) for _ in range(2))  # 2 shared
    allowed = torch.rand(2, 1, 5, 11, generator=generator) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill_(~allowed, torch.finfo(torch.float64).min)
    expected, _ = sdpa_attention_forward(_Attention(), query, key, value, mask, scaling=0.5)
    found, _ = grouped_sdpa_forward(_Attention(), query, key, value, mask, scaling=0.5)
    assert found.shape == (2, 5, 6, 8)
    torch.testing.assert_close(found, expected, atol=1e-12, rtol=0)
    again, _ = grouped_sdpa_forward(_Attention(), query, key, value, mask, scaling=0.5)
    assert mask._lorakit_folded.shape == (2, 1, 15, 11)  # folded once, kept on the mask for the next layer
    torch.testing.assert_close(again, expected, atol=1e-12, rtol=0)


def test_the_model_attends_alike_and_gets_its_attention_back():
    model, ids = tiny_llama(), token_batch(2, 9)
    mask = torch.zeros(2, 1, 9, 9).masked_fill_(torch.ones(9, 9).triu(1).bool(), torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with grouped_query_attention(model):
            assert model.config._attn_implementation == GROUPED_SDPA
            found = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)
