"""LQ-LoRA and LoftQ as adapter initialisations: each adapted linear's base becomes the quantized ``Q`` of
``W ~= Q + L1 L2``, and the adapter starts at the low-rank part (LQ-LoRA: Guo et al., ICLR 2024; LoftQ:
Li et al., ICLR 2024)::

    lorakit.attach(model, config)                          # a placeholder adapter, rank r per module
    decompositions = init_lq_lora(model, budget=2.75)      # or init_loftq(model)
    ...                                                    # train A and B; Q stays frozen

After it, ``base_layer`` is an :class:`~lorakit.quant.NFLinear` holding ``Q`` (its bias kept), ``B = L1 / s``
(out, r) and ``A = L2`` (r, in), so the adapter's ``s B A = L1 L2`` exactly and the model computes
``(Q + L1 L2) x + bias``. LQ-LoRA chooses each matrix's config under the bit budget
(:mod:`lorakit.init.lq_lora.mixed_configs`), optionally Fisher-weighted; LoftQ runs the same alternation at
one config, NF4 in blocks of 64, for one iteration by default (PEFT's ``loftq_iter``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.layer import LoraLayer
from lorakit.core.state import model_state
from lorakit.errors import StateError, TargetError
from lorakit.init.lq_lora.config_grid import SMALL_GRID
from lorakit.init.lq_lora.decomposition import Decomposition, decompose
from lorakit.init.lq_lora.mixed_configs import mixed_decompositions
from lorakit.quant.nf_config import NFConfig
from lorakit.quant.quantized_adapter import quantize_bases

LOFTQ_CONFIG = NFConfig(bits=4, block_size=64)
"""LoftQ's quantizer: NF4 in blocks of 64, fp32 absmax scales."""


def adapted_layers(model: nn.Module, name: str) -> dict[str, LoraLayer]:
    """The layers of adapter ``name`` by module name; refuses bases that are not ``nn.Linear`` and merged adapters."""
    layers = {module_name: model.get_submodule(module_name) for module_name in model_state(model).require(name).modules}
    for module_name, layer in layers.items():
        if type(layer.base_layer) is not nn.Linear:
            raise TargetError(f"LQ-LoRA and LoftQ quantize nn.Linear bases only; module {module_name!r} is an "
                              f"{type(layer.base_layer).__name__}: leave it out of the targets")
        if layer.merged:
            raise StateError(f"adapters {sorted(layer.merged)} are merged into {module_name!r}; unmerge them first")
    return layers


def init_lq_lora(model: nn.Module, name: str = "default", *, budget: float, grid: Sequence[NFConfig] = SMALL_GRID,
                 fisher: Mapping[str, torch.Tensor] | None = None, max_iterations: int = 100, chunks: int = 1,
                 progress: bool = True) -> dict[str, Decomposition]:
    """LQ-LoRA: decompose every base weight of adapter ``name`` under the config the bit allocation chose
    (``budget`` bits per parameter over all of them, or over each of ``chunks`` consecutive groups; ``fisher`` by
    module name to weight the error), then start from the decompositions (module docstring). Returns them by
    module name."""
    layers = adapted_layers(model, name)
    weights = {module_name: layer.base_layer.weight for module_name, layer in layers.items()}
    ranks = {module_name: layer.adapters[name].rank for module_name, layer in layers.items()}
    decompositions = mixed_decompositions(weights, ranks, grid, budget, fisher=fisher, max_iterations=max_iterations,
                                          chunks=chunks, progress=progress)
    start_from(model, decompositions, name)
    return decompositions


def init_loftq(model: nn.Module, name: str = "default", *, config: NFConfig = LOFTQ_CONFIG, iterations: int = 1,
               progress: bool = True) -> dict[str, Decomposition]:
    """LoftQ: the alternation at one ``config`` for up to ``iterations`` iterations per base weight of adapter
    ``name``, then start from the decompositions (module docstring). Returns them by module name."""
    decompositions = {}
    for module_name, layer in tqdm(adapted_layers(model, name).items(), disable=not progress, desc="loftq",
                                   unit="matrix"):
        decompositions[module_name] = decompose(layer.base_layer.weight, layer.adapters[name].rank, config,
                                                max_iterations=iterations)
    start_from(model, decompositions, name)
    return decompositions


def start_from(model: nn.Module, decompositions: Mapping[str, Decomposition], name: str = "default") -> None:
    """Quantize each base to its ``Q`` and set adapter ``name`` to ``B = L1 / s``, ``A = L2``."""
    quantize_bases(model, {module_name: d.quantized for module_name, d in decompositions.items()})
    with torch.no_grad():
        for module_name, decomposition in decompositions.items():
            adapter = model.get_submodule(module_name).adapters[name]
            adapter.B.copy_(decomposition.L1 / adapter.scale)
            adapter.A.copy_(decomposition.L2)
