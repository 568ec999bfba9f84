"""Batched text generation with the KV cache: greedy or sampled, stopping at the end of turn.

Prompts are rendered exactly as training renders them (the chat template when ``chat``), left-padded
in batches, and decoded without the prompt. Generation stops at the tokenizer's EOS and at the
model's configured end tokens (``<|im_end|>`` for ChatML models).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.modes import eval_mode
from lorakit.data.encoding import pad_id, prompt_ids
from lorakit.data.example import Example
from lorakit.data.formatting import use_chat
from lorakit.errors import ConfigError


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token id that ends a generation: the tokenizer's EOS and the model's configured ones."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str | Example], *, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
             chat: bool | None = None, seed: int | None = None, progress: bool = False,
             model_options: dict | None = None) -> list[str]:
    """Complete each prompt (a string, or an Example whose prompt part is used); returns the new text only.

    ``model_options`` go to ``model.generate`` as they are (e.g. X-LoRA's ``reuse_prompt_scalings``)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be positive")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be positive when sampling")
    chat = use_chat(tokenizer, chat)
    if seed is not None:
        torch.manual_seed(seed)
    encoded = [prompt_ids(tokenizer, p, chat=chat) for p in prompts]
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    outputs: list[str] = []
    with eval_mode(model):
        starts = range(0, len(encoded), batch_size)
        for start in tqdm(starts, disable=not progress, desc="generate", unit="batch"):
            rows = encoded[start:start + batch_size]
            input_ids, mask = _left_pad(rows, pad)
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, pad_token_id=pad,
                                       eos_token_id=stop_token_ids(model, tokenizer), **sampling,
                                       **(model_options or {}))
            new_tokens = generated[:, input_ids.shape[1]:]
            outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask), as decoder-only generation needs."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return input_ids, mask
