"""Tiny models and helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorakit.core.state import lora_layers

VOCAB = 128


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


CHAT_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer():
    """A character-level tokenizer (printable ASCII and newline, < 128 ids) with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(CHAT_SPECIALS + alphabet)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def run_interrupted(monkeypatch, at_step: int, run) -> None:
    """Call ``run()`` with the training loop killed (KeyboardInterrupt) as it starts step ``at_step`` (0-based)."""
    import pytest

    from lorakit.train import loop

    real_step = loop._Run._step

    def crash(self, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real_step(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop._Run, "_step", crash)
        with pytest.raises(KeyboardInterrupt):
            run()
