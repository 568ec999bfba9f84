"""The end of a PAT run: the masked hidden channels physically removed, the result a plain, narrower model of
the same class (Liu et al., AAAI'25, arXiv 2408.14721; the paper's ``merge_dimdown.py`` folds the same way).

Any LoRA adapter is merged first. With the final hard mask (kept channels K, |K| = k of d) and each HSM's
M = diag(s * m) (I + V U) (y = M x on column vectors)::

    embedding E (vocab, d)                 E'  = (E M_emb^T)[:, K]
    o_proj W_o (d, heads head_dim)         W_o' = (M_attn W_o)[K, :]    (bias: (M_attn b)[K])
    down_proj W_down (d, ffn)              W_down' = (M_mlp W_down)[K, :]
    q/k/v, gate/up, lm_head                W[:, K]
    RMSNorm weights                        w[K] sqrt(d / k),  rms_norm_eps -> eps d / k

The residual stream is zero outside K, so a norm over the k kept channels equals the norm over all d once the
weight and eps are rescaled (mean over k = mean over d times d / k). ``head_dim`` is written into the config
(it no longer follows from hidden / heads); tied embeddings are untied (the folded embedding is not the head).
The folding runs in float64 and each weight returns to its own dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lorakit.core.merge import merge_and_unload
from lorakit.errors import ModelError
from lorakit.io.files import save_json
from lorakit.io.model_kind import save_model
from lorakit.models.skeleton import causal_lm_skeleton, check_filled, set_parameter
from lorakit.pruning.channel_mask import hard_mask
from lorakit.pruning.decoder_blocks import decoder_blocks, head_geometry
from lorakit.pruning.pat_model import PAT_ATTRIBUTE, PatModules, pat_modules, rehook_pat

PAT_FILE = "pat.json"
_FOLD = torch.float64

Cut = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PatCut:
    """What the removal did: ``width`` hidden channels became ``kept``, parameters before and after."""

    width: int
    kept: int
    parameters_before: int
    parameters_after: int

    @property
    def keep(self) -> float:
        return self.kept / self.width

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "keep": self.keep}


def _cuts(model: nn.Module, pat: PatModules, blocks: nn.ModuleList, kept: torch.Tensor) -> dict[str, Cut]:
    """How each parameter of the merged model becomes its narrow version, by parameter name."""
    mask = hard_mask(pat.mask.raw, pat.mask.kept)
    width = mask.numel()
    norm_gain = math.sqrt(width / kept.numel())
    where = {module: name for name, module in model.named_modules()}
    cuts: dict[str, Cut] = {}

    def put(module: nn.Module, parameter: str, cut: Cut) -> None:
        cuts[f"{where[module]}.{parameter}"] = cut

    def columns(weight: torch.Tensor) -> torch.Tensor:  # (out, d) -> (out, k)
        return weight[:, kept]

    def norm(weight: torch.Tensor) -> torch.Tensor:  # (d,) -> (k,)
        return weight[kept] * norm_gain

    embedding_rows = pat.embedding.folded(mask, _FOLD)[kept]  # (k, d)
    put(model.model.embed_tokens, "weight", lambda weight: weight @ embedding_rows.T)  # (vocab, k)
    for block, attention, mlp in zip(blocks, pat.attention, pat.mlp, strict=True):
        for reader in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                       block.mlp.gate_proj, block.mlp.up_proj):
            put(reader, "weight", columns)
            put(reader, "bias", lambda bias: bias)  # (out,): may be d wide, yet reads nothing of the stream
        for writer, hsm in ((block.self_attn.o_proj, attention), (block.mlp.down_proj, mlp)):
            rows = hsm.folded(mask, _FOLD)[kept]  # (k, d)
            put(writer, "weight", lambda weight, rows=rows: rows @ weight)  # (k, in)
            put(writer, "bias", lambda bias, rows=rows: rows @ bias)  # (k,)
        put(block.input_layernorm, "weight", norm)
        put(block.post_attention_layernorm, "weight", norm)
    put(model.model.norm, "weight", norm)
    put(model.lm_head, "weight", columns)
    return cuts


def _narrow_config(model: nn.Module, kept: int) -> Any:
    config = copy.deepcopy(model.config)
    width = config.hidden_size
    config.head_dim = head_geometry(model).head_dim
    config.hidden_size = kept
    config.rms_norm_eps = config.rms_norm_eps * width / kept
    config.tie_word_embeddings = False
    return config


def _untie_head(model: nn.Module) -> bool:
    """Give the head its own copy of a weight tied to the embedding, so that merging an adapter on either one
    changes that one only (merged into the shared tensor, it would change both); True if they were tied."""
    head = getattr(model.lm_head, "base_layer", model.lm_head)
    embedding = getattr(model.model.embed_tokens, "base_layer", model.model.embed_tokens)
    tied = head.weight is embedding.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    return tied


def _own_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model``'s parameters by name, shared ones under each name, PAT's own left out."""
    return [(name, parameter) for name, parameter in model.named_parameters(remove_duplicate=False)
            if not name.startswith(f"{PAT_ATTRIBUTE}.")]


def remove_pat_channels(model: PreTrainedModel) -> tuple[PreTrainedModel, PatCut]:
    """Merge ``model``'s adapters and cut the channels PAT's hard mask drops (module docstring).

    Returns a new model of ``model``'s class with hidden size k (loadable by ``transformers`` alone, in eval mode,
    on ``model``'s device and dtype) and what was cut. ``model`` itself is left at full width with its adapters
    merged (its head untied from the embedding) and PAT still attached: in the hard phase it computes what the
    narrow model computes."""
    pat = pat_modules(model)
    tied = _untie_head(model)
    if getattr(model, "lorakit_state", None) is not None:
        merge_and_unload(model)
        rehook_pat(model)  # an adapter on embed_tokens was a wrapper, which carried the hook
    parameters_before = sum(p.numel() for _, p in _own_parameters(model))
    parameters_before -= model.lm_head.weight.numel() if tied else 0  # counted once, as the base holds it
    blocks = decoder_blocks(model)
    kept = pat.mask.kept_indices()
    width = pat.mask.raw.numel()
    cuts = _cuts(model, pat, blocks, kept)
    weight = model.model.embed_tokens.weight
    narrow = causal_lm_skeleton(_narrow_config(model, kept.numel()), dtype=weight.dtype)
    with torch.no_grad():
        for name, parameter in _own_parameters(model):
            if name in cuts:
                value = cuts[name](parameter.detach().to(_FOLD)).to(parameter.dtype)
            elif width in parameter.shape:
                raise ModelError(f"PAT's removal does not know how to cut {name!r} {tuple(parameter.shape)}, which "
                                 f"has the hidden width {width}")
            else:
                value = parameter.detach().clone()
            set_parameter(narrow, name, value)
    check_filled(narrow)
    if getattr(model, "generation_config", None) is not None:
        narrow.generation_config = copy.deepcopy(model.generation_config)
    narrow.to(weight.device).eval()
    cut = PatCut(width=width, kept=kept.numel(), parameters_before=parameters_before,
                 parameters_after=sum(p.numel() for p in narrow.parameters()))
    return narrow, cut


def save_pat_model(model: PreTrainedModel, tokenizer: Any, out_dir: Path, cut: PatCut) -> Path:
    """Write the narrow ``model`` and ``tokenizer`` to ``out_dir`` as a ``model`` directory (``lorakit.load`` and
    ``AutoModelForCausalLM.from_pretrained`` read it), with ``pat.json`` (``cut``), every file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(out_dir / PAT_FILE, cut.to_json())
    save_model(model, tokenizer, out_dir, origin="pat")
    return out_dir
