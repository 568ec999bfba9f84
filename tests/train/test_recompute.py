"""Activation checkpointing (``--gradient-checkpointing``): the gradients are the ones without it (dropout's masks
drawn again alike, what the forward records recorded once), far fewer bytes are kept for the backward, the blocks
are as they were afterwards, and every training method trains the same adapter with it."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.cli.main import main
from lorakit.data.jsonl import save_jsonl
from lorakit.train import recompute
from lorakit.train.recompute import recomputed_blocks
from tests.helpers import copy_examples, read_tensors, tiny_llama, token_batch


def _adapter_grads(model, ids, checkpointed: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The adapter's gradients of one loss and the bytes autograd kept for the backward."""
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(7)  # the dropout masks
    model.zero_grad()
    with recomputed_blocks(model, checkpointed), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


def test_checkpointing_leaves_the_gradients_and_keeps_fewer_bytes():
    model = tiny_llama().train()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=0.1))
    ids = token_batch(2, 32)
    plain, plain_bytes = _adapter_grads(model, ids, False)
    checkpointed, checkpointed_bytes = _adapter_grads(model, ids, True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)
    assert checkpointed_bytes < 0.5 * plain_bytes
    assert all("forward" not in vars(block) for block in model.model.layers)  # the blocks are as they were


def test_a_model_without_blocks_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--gradient-checkpointing works block by block"):
        with recomputed_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


@pytest.mark.parametrize("flags", [[], ["--method", "mixlora"], ["--method", "dylora"], ["--regularizer", "ba-lora"],
                                   ["--init", "eva"], ["--dropout", "0.1"]],
                         ids=["lora", "mixlora", "dylora", "ba-lora", "eva", "dropout"])
def test_training_with_checkpointing_gives_the_same_adapter(base_dir, tmp_path, flags, monkeypatch):
    save_jsonl(tmp_path / "train.jsonl", copy_examples(16))
    calls = []
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or torch_checkpoint(*a, **k))

    def trained(name: str, *extra: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        assert main(["train", "--data", str(tmp_path / "train.jsonl"), "--out", str(out), "--base", str(base_dir),
                     "--steps", "3", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--lr", "0.01", "--seed",
                     "0", "--quiet", *flags, *extra]) == 0
        return {re.sub(r"mixlora-[0-9a-f]{8}", "mixlora-*", f"{p.relative_to(out)}:{k}"): v  # named afresh each save
                for p in sorted(out.rglob("*.safetensors")) if "checkpoints" not in p.parts
                for k, v in read_tensors(p).items()}

    plain = trained("plain")
    assert not calls
    checkpointed = trained("checkpointed", "--gradient-checkpointing")
    assert len(calls) >= 3 * 2  # every block of every step's forward went through the checkpoint
    assert plain.keys() == checkpointed.keys() and plain
    for name, tensor in plain.items():
        torch.testing.assert_close(checkpointed[name], tensor, atol=1e-6, rtol=0, msg=name)
