"""The loss's logits at supervised positions only: the same numbers and gradients as selecting from the
model's full logits, on every path (head on the last hidden state, fallback, mixed batches, packing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit import LoraConfig
from lorakit.data.encoding import IGNORE_INDEX
from lorakit.models.supervised_loss import _body_and_head, logits_loss, row_losses, supervised_outputs
from tests.helpers import adapted, labelled_batch, perturb, reference, tiny_gpt2, tiny_llama, token_batch


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_head_runs_on_supervised_positions_only_with_the_same_logits_and_gradients(make):
    model, batch = adapted(make), labelled_batch()
    assert _body_and_head(model, per_row=False) is not None
    outputs = supervised_outputs(model, batch)
    assert outputs.logits.shape[0] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 6 + 5 + 4
    expected = reference(model, batch)
    torch.testing.assert_close(outputs.logits, expected, atol=1e-5, rtol=1e-5)
    logits_loss(outputs).backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(reference(model, batch), outputs.targets, reduction="sum").backward()
    for name, grad in fast.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_row_losses_sum_each_rows_tokens():
    model, batch = adapted(tiny_llama), labelled_batch()
    outputs = supervised_outputs(model, batch)
    tokens = F.cross_entropy(outputs.logits, outputs.targets, reduction="none")
    expected = torch.stack([tokens[outputs.rows == row].sum() for row in range(3)])
    torch.testing.assert_close(row_losses(outputs), expected)
    assert outputs.rows.tolist() == [0] * 6 + [1] * 5 + [2] * 4


def test_a_model_outside_the_known_families_computes_full_logits_and_agrees():
    model, batch = adapted(tiny_llama), labelled_batch()
    model.config.model_type = "gemma2"  # soft-capped heads: the head cannot be split off
    assert _body_and_head(model, per_row=False) is None
    torch.testing.assert_close(supervised_outputs(model, batch).logits, reference(model, batch))


def test_a_mixed_batch_routes_rows_on_both_paths_and_an_adapted_head_keeps_the_full_path():
    config = LoraConfig(rank=2, alpha=4, targets=("q_proj", "lm_head"))
    model = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.attach(model, config, name)
        perturb(model, name, seed=seed)
    batch = {**labelled_batch(), "adapter_per_row": ["a", None, "b"]}
    assert _body_and_head(model, per_row=True) is None and _body_and_head(model, per_row=False) is not None
    expected = reference(model, batch, adapter_per_row=["a", None, "b"])
    torch.testing.assert_close(supervised_outputs(model, batch).logits, expected, atol=1e-5, rtol=1e-5)
    plain = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.attach(plain, LoraConfig(rank=2, alpha=4, targets=("q_proj",)), name)
        perturb(plain, name, seed=seed)
    assert _body_and_head(plain, per_row=True) is not None
    torch.testing.assert_close(supervised_outputs(plain, batch).logits,
                               reference(plain, batch, adapter_per_row=["a", None, "b"]), atol=1e-5, rtol=1e-5)


def test_packed_rows_use_position_ids_on_the_fast_path():
    model = adapted(tiny_llama)
    ids = token_batch(1, 12)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX
    labels[0, 5:7] = IGNORE_INDEX
    outputs = supervised_outputs(model, {"input_ids": ids, "position_ids": positions, "labels": labels})
    full = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    torch.testing.assert_close(outputs.logits, full, atol=1e-5, rtol=1e-5)
