"""PAT's parts by hand: the mask schedule (soft, hard), the mask-count loss and its straight-through gradient, the
HSM, its identity loss and folded matrix, and a freshly attached PAT leaving the model's logits unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import ConfigError, ModelError
from lorakit.pruning.channel_mask import (
    ChannelMask,
    binarize,
    kept_indices,
    mask_bias,
    mask_count_loss,
    temperature,
)
from lorakit.pruning.hybrid_sparsification import HybridSparsification
from lorakit.pruning.pat_model import attach_pat, detach_pat
from lorakit.train.components import METHODS
from tests.helpers import tiny_llama, token_batch
from tests.helpers.tiny_models import logits


def test_the_schedule_matches_the_formula_by_hand():
    assert temperature(0, 10) == temperature(1, 10) == pytest.approx(1 / (1 + 1e-6), abs=0, rel=1e-15)
    assert temperature(5, 10) == pytest.approx(1 / (1 - math.log(5) / math.log(10) + 1e-6))
    assert temperature(0, 1) == pytest.approx(1 / (1 + 1e-6))  # one step: log G = 0 is guarded
    assert (mask_bias(0, 10), mask_bias(3, 10), mask_bias(6, 10)) == (0.5, pytest.approx(0.2), 0.0)
    mask = ChannelMask(4, keep=0.5, freeze=0.8)
    with torch.no_grad():
        mask.raw.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
    mask.set_step(5, 10)  # soft: sigmoid(T mu) + 0
    expected = torch.sigmoid(temperature(5, 10) * mask.raw.detach())
    assert torch.allclose(mask(), expected) and mask().requires_grad
    mask.set_step(2, 10)
    assert torch.allclose(mask(), torch.sigmoid(temperature(2, 10) * mask.raw.detach()) + 0.3)
    mask.set_step(8, 10)  # hard from 0.8 G on: the 2 largest mu, no gradient
    assert mask.hard and torch.equal(mask(), torch.tensor([1.0, 0.0, 1.0, 0.0])) and not mask().requires_grad
    assert mask.loss().item() == 0 and not mask.loss().requires_grad


def test_a_fresh_mask_is_all_ones_and_ties_go_to_the_lower_index():
    mask = ChannelMask(6, keep=0.5, freeze=0.8)
    mask.set_step(0, 10)
    assert torch.equal(mask(), torch.ones(6))
    assert kept_indices(torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0]), 3).tolist() == [0, 1, 3]


def test_the_count_loss_and_its_straight_through_gradient():
    raw = torch.tensor([0.5, -0.2, 0.0, 1.0, -1.5], requires_grad=True)
    loss = mask_count_loss(raw, kept=2)
    # binarize = [1, 0, 1, 1, 0] -> |3 - 2| / 2; mu > 0: 0.5, 1.0; mu <= 0: -0.2, 0.0, -1.5
    by_hand = 10 * 1 / 2 + (0.0 + 0.25) / 2 + (0.3 ** 2 + 0.5 ** 2 + 1.0 ** 2) / 3
    assert loss.item() == pytest.approx(by_hand)
    loss.backward()
    # count term: 10 / k per channel through the identity; the pull terms: 2 (mu -+ 0.5) / |set|
    pull = torch.tensor([0.0, 2 * 0.3 / 3, 2 * 0.5 / 3, 2 * 0.5 / 2, 2 * -1.0 / 3])
    assert torch.allclose(raw.grad, 10 / 2 + pull)
    assert torch.equal(binarize(torch.tensor([-0.1, 0.0, 0.2])), torch.tensor([0.0, 1.0, 1.0]))


def test_an_empty_side_counts_zero_not_nan():
    assert mask_count_loss(torch.zeros(4), kept=2).item() == pytest.approx(10 * 2 / 2 + 0.25)


def test_the_hsm_its_identity_loss_and_folded_matrix():
    torch.manual_seed(0)
    hsm = HybridSparsification(5, 2)
    with torch.no_grad():
        hsm.V.normal_()
        hsm.scale.uniform_(0.5, 1.5)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.3, 1.0])
    x = torch.randn(3, 5)
    by_hand = (x + (x @ hsm.U.T) @ hsm.V.T) * hsm.scale * mask
    assert torch.allclose(hsm(x, mask), by_hand)
    assert torch.allclose(hsm(x, mask).double(), x.double() @ hsm.folded(mask).T)
    U = hsm.U.detach()
    assert hsm.identity_loss().item() == pytest.approx(((U @ U.T - torch.eye(2)) ** 2).mean().item())
    assert torch.equal(HybridSparsification(5, 2).V, torch.zeros(5, 2))


def test_a_fresh_pat_model_computes_exactly_the_base():
    model, ids = tiny_llama(), token_batch()
    plain = logits(model, ids)
    pat = attach_pat(model, keep=0.5, rank=4)
    assert torch.equal(logits(model, ids), plain)
    names = {name for name, _ in model.named_parameters()}
    assert {"pat.mask.raw", "pat.embedding.U", "pat.attention.1.V", "pat.mlp.0.scale"} <= names
    assert len(pat.sparsifiers()) == 5 and set(pat.loss_terms()) == {"pat_mask", "pat_identity"}
    with pytest.raises(ModelError, match="already has PAT attached"):
        attach_pat(model)
    with torch.no_grad():
        pat.attention[0].V.normal_()
    assert not torch.equal(logits(model, ids), plain)
    detach_pat(model)
    assert torch.equal(logits(model, ids), plain) and not hasattr(model, "pat")


@pytest.mark.parametrize(("option", "value"), [("pat_keep", 1.5), ("pat_keep", 0), ("pat_rank", 0),
                                               ("pat_rank", 2.5), ("pat_freeze", 1.2), ("pat_identity_loss", "yes")])
def test_bad_options_are_refused_by_name(option, value):
    entry = METHODS["pat"]
    with pytest.raises(ConfigError, match=option):
        entry.build(None, {**entry.options, option: value})
