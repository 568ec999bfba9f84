"""X-LoRA generation with one KV cache per pass.

The prompt runs both passes once, filling the scaling-pass cache and the real-pass cache; every
new token then costs one single-token step of each pass (PEFT re-runs both passes over the whole
prefix for every token). With ``reuse_prompt_scalings`` the new tokens reuse the scalings of the
prompt's last token and skip the scaling pass: one pass per token, an approximation (X-LoRA's
scalings would otherwise follow each new token). ``use_cache=False`` recomputes everything each
step and exists to check the cached path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lorakit.errors import ConfigError


def _stop_ids(eos_token_id: int | Iterable[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def choose_next(logits: torch.Tensor, *, do_sample: bool, temperature: float | None, top_p: float | None,
                top_k: int | None) -> torch.Tensor:
    """The next token of each row: argmax, or a sample from ``softmax(logits / T)`` cut to top-k/top-p."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / (temperature or 1.0)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - ordered.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, pad_token_id: int | None = None,
             eos_token_id: int | Iterable[int] | None = None, use_cache: bool = True,
             reuse_prompt_scalings: bool = False, **_: Any) -> torch.Tensor:
    """Prompt plus new tokens, ``(B, S + new)``, like ``transformers``' ``generate`` (left padding)."""
    if reuse_prompt_scalings and not use_cache:
        raise ConfigError("reuse_prompt_scalings needs use_cache=True")
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    stops = torch.tensor(_stop_ids(eos_token_id), device=input_ids.device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(stops[0]) if len(stops) else 0)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens, caches, reused = input_ids, None, None
    step_inputs = {"input_ids": input_ids, "position_ids": positions}
    for _ in range(max_new_tokens):
        out = model(**step_inputs, attention_mask=mask, past_key_values=caches, use_cache=use_cache,
                    scalings=reused)
        if use_cache:
            caches = out.past_key_values
            if reuse_prompt_scalings and reused is None:
                reused = out.scalings[:, -1:]
        chosen = choose_next(out.logits[:, -1].float(), do_sample=do_sample, temperature=temperature,
                             top_p=top_p, top_k=top_k)
        chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
        tokens = torch.cat([tokens, chosen[:, None]], dim=-1)
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=-1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=-1)
        finished |= torch.isin(chosen, stops)
        if bool(finished.all()):
            break
        step_inputs = ({"input_ids": chosen[:, None], "position_ids": positions[:, -1:]} if use_cache
                       else {"input_ids": tokens, "position_ids": positions})
    return tokens
