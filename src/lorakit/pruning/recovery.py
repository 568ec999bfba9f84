"""LoRAM's recovery: an adapter trained on the pruned model, put back at the full model's shapes.

For a projection whose output rows were cut (q, k, v, gate, up) the trained ``B`` (out_kept, r) goes to the kept
rows of a zero ``B`` (out, r); ``A`` (r, hidden) is unchanged. For one whose input columns were cut (o, down) the
trained ``A`` (r, in_kept) goes to the kept columns of ``A`` (r, in), the pruned columns zero (``zero``, the paper's
"zeroA") or N(0, 1/r) (``normal``, "normA"); ``B`` is unchanged. With ``zero``, ``dW = s B A`` of the full model is
exactly the pruned model's ``dW`` at the kept indices and zero at every pruned row and column (Zhang et al.,
ICLR'25, arXiv 2502.13533, step 3). Modules pruning left whole keep their tensors as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorakit.errors import ConfigError
from lorakit.pruning.structured import PruneMap


def _module_and_factor(key: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (``base_model.model.X``, ``A``)."""
    for factor in ("A", "B"):
        marker = f".lora_{factor}."
        if marker in key:
            return key.split(marker)[0], factor
    return key, ""


def recover_tensors(tensors: Mapping[str, torch.Tensor], prune_map: PruneMap, *, recover: str = "zero",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """The full-size adapter tensors (PEFT keys) of the pruned model's ``tensors`` (module docstring)."""
    if recover not in ("zero", "normal"):
        raise ConfigError(f"recover={recover!r} is invalid: zero or normal")
    generator = torch.Generator().manual_seed(seed)
    recovered = {}
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        module, factor = _module_and_factor(key)
        kept = prune_map.kept(module)
        side = kept[0] if kept else None
        cut_dim = {("out", "B"): 0, ("in", "A"): 1}.get((side, factor))
        if cut_dim is not None and tensor.shape[cut_dim] != len(kept[1]):
            raise ConfigError(f"{key} has {tensor.shape[cut_dim]} {'rows' if cut_dim == 0 else 'columns'}, but the "
                              f"prune map keeps {len(kept[1])} there: the adapter was not trained on this pruned model")
        if side == "out" and factor == "B":
            full = tensor.new_zeros(prune_map.full_size(module), tensor.shape[1])  # (out, r)
            full[kept[1]] = tensor
        elif side == "in" and factor == "A":
            rank = tensor.shape[0]
            full = tensor.new_zeros(rank, prune_map.full_size(module))  # (r, in)
            if recover == "normal":
                noise = torch.randn(full.shape, generator=generator, dtype=torch.float32) / rank ** 0.5
                full.copy_(noise.to(full.dtype))
            full[:, kept[1]] = tensor
        else:
            full = tensor.clone()
        recovered[key] = full.contiguous()
    return recovered
