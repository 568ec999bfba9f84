"""Tiny random models (Llama, GPT-2, a conv net), token batches, and adapters attached to them."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig
from lorakit.core.state import lora_layers

VOCAB = 128
#: The adapter the training tests attach (dropout on, so resume must restore the RNG too).
LORA = LoraConfig(rank=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
#: The adapter :func:`adapted` attaches by default.
ALL_LINEAR = LoraConfig(rank=4, alpha=8, targets="all-linear")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama (hidden 64), in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised 2-layer GPT-2 (its attention and MLP use ``Conv1D``), in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(config).eval()


class TinyConvNet(nn.Module):
    """Conv2d -> ReLU -> Conv2d (1x1) -> Linear, for the Conv2d kind."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, kernel_size=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.head(self.conv2(x).flatten(1))


def token_batch(rows: int = 3, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, length), generator=generator)


def perturb(model: nn.Module, name: str, seed: int = 0, std: float = 0.2) -> None:
    """Give adapter ``name`` random non-zero A and B so that it changes the output (PEFT's trick)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.adapters:
                adapter = layer.adapters[name]
                adapter.A.copy_(torch.randn(adapter.A.shape, generator=generator) * std)
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * std)


def logits(model: nn.Module, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def adapter_model(adapter_seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama with the training tests' adapter :data:`LORA` attached as ``default`` (B = 0)."""
    model = tiny_llama()
    torch.manual_seed(adapter_seed)
    lorakit.attach(model, LORA)
    return model


def adapted(make, config: LoraConfig = ALL_LINEAR) -> nn.Module:
    """``make()`` with adapter ``default`` attached and perturbed, so that it changes the logits."""
    model = make()
    lorakit.attach(model, config)
    perturb(model, "default")
    return model
