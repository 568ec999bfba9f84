"""PAT's physical removal is exact: a tiny Llama with random HSMs, a hard random mask and a LoRA adapter (B != 0)
gives the logits of its cut, narrower model, tied embeddings or not, also once saved and reloaded by transformers
alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ModelError
from lorakit.pruning.pat_model import attach_pat
from lorakit.pruning.pat_removal import PAT_FILE, remove_pat_channels, save_pat_model
from tests.helpers import char_tokenizer, token_batch
from tests.helpers.tiny_models import ALL_LINEAR, VOCAB, logits, perturb


def _llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _masked(tied: bool, adapter: LoraConfig = ALL_LINEAR) -> LlamaForCausalLM:
    """The tiny Llama with a perturbed ``adapter`` and PAT (keep 0.75) with random U, V, s, mu, in its hard
    phase."""
    model = _llama(tied)
    lorakit.attach(model, adapter)
    perturb(model, "default")
    pat = attach_pat(model, keep=0.75, rank=4)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for hsm in pat.sparsifiers():
            hsm.U.copy_(torch.randn(hsm.U.shape, generator=generator) * 0.2)
            hsm.V.copy_(torch.randn(hsm.V.shape, generator=generator) * 0.2)
            hsm.scale.copy_(torch.rand(hsm.scale.shape, generator=generator) + 0.5)
        pat.mask.raw.copy_(torch.randn(pat.mask.raw.shape, generator=generator))
    pat.mask.set_step(9, 10)
    assert pat.mask.hard and int(pat.mask().sum()) == 48
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_the_cut_model_gives_the_masked_models_logits(tied, tmp_path):
    model, ids = _masked(tied), token_batch()
    masked = logits(model, ids)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    narrow, cut = remove_pat_channels(model)
    scale = masked.abs().max()
    assert torch.allclose(logits(narrow, ids), masked, atol=1e-5 * scale, rtol=0)
    assert narrow.config.hidden_size == cut.kept == 48 and cut.width == 64 and cut.keep == 0.75
    assert narrow.config.head_dim == 16 and not narrow.config.tie_word_embeddings
    assert cut.parameters_after == sum(p.numel() for p in narrow.parameters()) < cut.parameters_before
    assert getattr(model, "lorakit_state", None) is None  # merged, PAT still attached: the same function
    assert torch.allclose(logits(model, ids), masked, atol=1e-5 * scale, rtol=0)

    save_pat_model(narrow, char_tokenizer(), tmp_path / "pat", cut)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pat").eval()
    assert type(reloaded) is LlamaForCausalLM and reloaded.config.hidden_size == 48
    assert torch.allclose(logits(reloaded, ids), masked, atol=1e-5 * scale, rtol=0)
    record = json.loads((tmp_path / "pat" / PAT_FILE).read_text())
    assert record == {"width": 64, "kept": 48, "keep": 0.75, "parameters_before": cut.parameters_before,
                      "parameters_after": cut.parameters_after}
    loaded = lorakit.load(tmp_path / "pat")
    assert loaded.kind == "model" and torch.equal(logits(loaded.model, ids), logits(reloaded, ids))


@pytest.mark.parametrize("tied", [True, False])
def test_adapters_on_the_embedding_and_the_head_are_folded_exactly(tied):
    """Tied, they share one tensor: the head gets its own copy before merging, so each adapter changes its own."""
    model = _masked(tied, LoraConfig(rank=4, alpha=8, targets=("embed_tokens", "lm_head", "o_proj")))
    masked = logits(model, token_batch())
    narrow, cut = remove_pat_channels(model)
    assert torch.allclose(logits(narrow, token_batch()), masked, atol=1e-5 * masked.abs().max(), rtol=0)
    assert torch.allclose(logits(model, token_batch()), masked, atol=1e-5 * masked.abs().max(), rtol=0)
    assert cut.parameters_before == sum(p.numel() for p in _llama(tied).parameters())


def test_a_model_without_pat_is_refused():
    with pytest.raises(ModelError, match="no PAT attached"):
        remove_pat_channels(_llama(tied=False))
