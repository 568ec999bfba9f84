"""PAT's hybrid sparsification modules in a Llama-style model: where they sit, how they attach and come off, and
their loss terms (Liu et al., AAAI'25, arXiv 2408.14721).

One HSM (:mod:`lorakit.pruning.hybrid_sparsification`) transforms each increment of the residual stream: the
token embedding's output, and each decoder block's attention output and MLP output (before the residual add).
They all multiply by the one shared channel mask (:mod:`lorakit.pruning.channel_mask`), so the residual stream is
zero at masked channels everywhere and cutting those channels is exact (:mod:`lorakit.pruning.pat_removal`).

The modules are the submodule ``pat`` of the model (a :class:`PatModules`), so that their parameters are
trainable, named (``pat.mask.raw``, ``pat.embedding.U``, ``pat.attention.0.V``, ``pat.mlp.1.scale``...) and held
by the trainer's checkpoints; forward hooks apply them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError, ModelError
from lorakit.pruning.channel_mask import ChannelMask
from lorakit.pruning.decoder_blocks import ATTENTION_PROJECTIONS, FFN_PROJECTIONS, decoder_blocks
from lorakit.pruning.hybrid_sparsification import HybridSparsification

PAT_ATTRIBUTE = "pat"


def check_pat_options(keep: float, rank: int, freeze: float) -> None:
    """Refuse a keep ratio outside (0, 1], a rank below 1, a freeze point outside (0, 1], naming the option."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"pat_keep is {keep!r}; the fraction of hidden channels kept, in (0, 1], is required")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"pat_rank is {rank!r}; a positive integer (the HSM operator rank) is required")
    if isinstance(freeze, bool) or not isinstance(freeze, (int, float)) or not 0 < freeze <= 1:
        raise ConfigError(f"pat_freeze is {freeze!r}; the fraction of the run after which the mask is hard, "
                          "in (0, 1], is required")


def check_dense(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Refuse, before training, layers whose weights the removal cannot fold: anything but a plain Linear /
    Embedding under its LoRA wrapper (a quantized base), and norms without ``rms_norm_eps``."""
    layers = {"model.embed_tokens": (model.model.embed_tokens, nn.Embedding), "lm_head": (model.lm_head, nn.Linear)}
    for index, block in enumerate(blocks):
        layers.update({f"model.layers.{index}.self_attn.{name}": (getattr(block.self_attn, name), nn.Linear)
                       for name in ATTENTION_PROJECTIONS})
        layers.update({f"model.layers.{index}.mlp.{name}": (getattr(block.mlp, name), nn.Linear)
                       for name in FFN_PROJECTIONS})
    for name, (layer, expected) in layers.items():
        layer = getattr(layer, "base_layer", layer)  # under a LoRA wrapper
        if type(layer) is not expected:
            raise ModelError(f"PAT folds dense weights, and {name} is a {type(layer).__name__} (not a plain "
                             f"{expected.__name__}): train PAT on an unquantized base")
    if getattr(model.config, "rms_norm_eps", None) is None:
        raise ModelError(f"{type(model).__name__}'s config has no rms_norm_eps: PAT's removal rescales RMSNorms")


class PatModules(nn.Module):
    """The shared ``mask`` and the HSMs of one model: ``embedding``, ``attention[i]`` and ``mlp[i]`` per block."""

    def __init__(self, width: int, blocks: int, *, keep: float, rank: int, freeze: float) -> None:
        super().__init__()
        self.mask = ChannelMask(width, keep, freeze)
        self.embedding = HybridSparsification(width, rank)
        self.attention = nn.ModuleList(HybridSparsification(width, rank) for _ in range(blocks))
        self.mlp = nn.ModuleList(HybridSparsification(width, rank) for _ in range(blocks))
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def unhook(self) -> None:
        """Remove the forward hooks that apply the modules."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def sparsifiers(self) -> list[HybridSparsification]:
        return [self.embedding, *self.attention, *self.mlp]

    def identity_loss(self) -> torch.Tensor:
        """The sum of every HSM's MSE(U U^T, I_r)."""
        return torch.stack([hsm.identity_loss() for hsm in self.sparsifiers()]).sum()

    def loss_terms(self, identity: bool = True) -> dict[str, torch.Tensor]:
        """``pat_mask`` (the mask-count loss) and, with ``identity``, ``pat_identity`` of the current step."""
        terms = {"pat_mask": self.mask.loss()}
        if identity:
            terms["pat_identity"] = self.identity_loss()
        return terms


def _increment_hook(pat: PatModules, hsm: HybridSparsification) -> Callable[[nn.Module, Any, Any], Any]:
    """A forward hook applying ``hsm`` with the current mask to a module's output (its element 0 if a tuple)."""
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (hsm(output[0], pat.mask()), *output[1:])
        return hsm(output, pat.mask())
    return hook


def attach_pat(model: nn.Module, *, keep: float = 0.75, rank: int = 16, freeze: float = 0.8) -> PatModules:
    """Attach PAT to a Llama-style causal LM: the shared mask keeping round(``keep`` d) of the d hidden channels
    at the end (hard from ``freeze`` of the run on) and HSMs of operator ``rank`` on the embedding, every
    attention and every MLP output. Returns the modules (also ``model.pat``), in float32 on the model's device.

    With the mask at step 0 (m = 1) and V = 0 the model computes exactly what it did. Wrapping or unwrapping
    ``embed_tokens`` afterwards (a LoRA adapter on it) needs :func:`rehook_pat`."""
    check_pat_options(keep, rank, freeze)
    if hasattr(model, PAT_ATTRIBUTE):
        raise ModelError(f"{type(model).__name__} already has PAT attached; detach_pat(model) first")
    blocks = decoder_blocks(model)
    check_dense(model, blocks)
    pat = PatModules(model.config.hidden_size, len(blocks), keep=keep, rank=rank, freeze=freeze)
    pat.to(next(model.parameters()).device)
    model.add_module(PAT_ATTRIBUTE, pat)
    rehook_pat(model)
    return pat


def rehook_pat(model: nn.Module) -> None:
    """Hook PAT's modules onto ``model``'s current embedding, attention and MLP modules (again, after a module
    there was wrapped or unwrapped)."""
    pat = pat_modules(model)
    pat.unhook()
    sites = [(model.model.embed_tokens, pat.embedding)]
    for block, attention, mlp in zip(decoder_blocks(model), pat.attention, pat.mlp, strict=True):
        sites += [(block.self_attn, attention), (block.mlp, mlp)]
    pat.hooks = [module.register_forward_hook(_increment_hook(pat, hsm)) for module, hsm in sites]


def pat_modules(model: nn.Module) -> PatModules:
    """The PAT modules attached to ``model``."""
    pat = getattr(model, PAT_ATTRIBUTE, None)
    if not isinstance(pat, PatModules):
        raise ModelError(f"{type(model).__name__} has no PAT attached; call attach_pat(model) first")
    return pat


def detach_pat(model: nn.Module) -> PatModules:
    """Remove PAT's hooks and the ``pat`` submodule from ``model``, which computes as without PAT again; returns
    the modules."""
    pat = pat_modules(model)
    pat.unhook()
    delattr(model, PAT_ATTRIBUTE)
    return pat
