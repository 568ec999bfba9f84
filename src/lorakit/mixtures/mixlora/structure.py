"""Finding the feed-forward networks MixLoRA can turn into mixtures, by structure, not by model name.

A supported FFN is a module with ``gate_proj``, ``up_proj`` and ``down_proj`` children (``nn.Linear``, or
lorakit layers wrapping one) and an ``act_fn``, computing ``down(act(gate(x)) * up(x))``: the gated FFN of
Llama, Mistral, Qwen2 and their relatives. The forward is checked on a small random input, so a module
that has those children but computes something else is refused rather than silently mixed. Any other
FFN (GPT-2's ``c_fc``/``c_proj``, Phi-3's fused ``gate_up_proj``, ...) is a :class:`TargetError` naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.layer import LoraLayer
from lorakit.errors import TargetError

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FFN_NAMES = ("mlp", "feed_forward", "ffn")
"""Module names that mean "this block's FFN": one of them with another structure is refused by name."""
EXPECTED = ("a gated FFN with gate_proj, up_proj, down_proj (nn.Linear) and act_fn, computing "
            "down_proj(act_fn(gate_proj(x)) * up_proj(x)) (Llama, Mistral, Qwen2 style)")


def base_linear(module: nn.Module | None) -> nn.Linear | None:
    """The ``nn.Linear`` that ``module`` is or wraps, else None."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    return base if isinstance(base, nn.Linear) else None


def is_gated_ffn(module: nn.Module) -> bool:
    """Whether ``module`` has the gated-FFN structure (its forward is checked by :func:`find_ffns`)."""
    return callable(getattr(module, "act_fn", None)) and all(
        base_linear(getattr(module, name, None)) is not None for name in PROJECTIONS)


@torch.no_grad()
def _computes_gated_ffn(module: nn.Module) -> bool:
    """Whether ``module(x) == down(act(gate(x)) * up(x))`` on a small random input."""
    gate, up, down = (getattr(module, name) for name in PROJECTIONS)
    weight = base_linear(gate).weight
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, weight.shape[1], generator=generator).to(weight)
    expected = down(module.act_fn(gate(x)) * up(x))
    return torch.allclose(module(x), expected, rtol=1e-4, atol=1e-5)


def _describe(name: str, module: nn.Module) -> str:
    children = ", ".join(child for child, _ in module.named_children()) or "none"
    return f"{name} ({type(module).__name__}, children: {children})"


def find_ffns(model: nn.Module) -> list[str]:
    """The module paths of every gated FFN of ``model``, in model order; a :class:`TargetError` names the
    first FFN-like module (named ``mlp``, ``feed_forward`` or ``ffn``) that is not one, or says none was found."""
    found, other = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        if is_gated_ffn(module):
            if not _computes_gated_ffn(module):
                raise TargetError(f"MixLoRA does not support the FFN {_describe(name, module)}: it has the "
                                  f"projections but its forward is not {EXPECTED}")
            found.append(name)
        elif name.rpartition(".")[2] in FFN_NAMES:
            other.append(name)
    if other:
        raise TargetError(f"MixLoRA does not support the FFN {_describe(other[0], model.get_submodule(other[0]))}: "
                          f"expected {EXPECTED}")
    if not found:
        raise TargetError(f"MixLoRA found no feed-forward network in {type(model).__name__}: expected {EXPECTED}")
    return found
