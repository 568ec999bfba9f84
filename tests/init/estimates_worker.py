"""The data-driven inits' estimates from this rank's share of one batch order: ``torchrun ... estimates_worker.py
OUT`` (or plain ``python``, alone, for the one-process estimates). Rank 0 writes LoRA-GA's gradients, the LQ-LoRA
Fisher, EVA's estimate and LQ-LoRA's cost sweep (each rank its share of the matrices) under ``OUT``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lorakit import LoraConfig
from lorakit.init.eva import estimate_eva
from lorakit.init.lora_ga import estimate_gradients
from lorakit.init.lq_lora import SMALL_GRID, decomposition_costs, estimate_fisher
from lorakit.io.files import save_tensors
from lorakit.parallel.process_group import current_ranks
from lorakit.train.distributed import start_process_group, stop_process_group
from tests.helpers import tiny_llama, token_batch

BATCHES = 7
"""Odd, so that the second of two ranks has one batch fewer (its share runs out a step early)."""


def prompt_masked_batches(count: int) -> list[dict[str, torch.Tensor]]:
    """LM batches whose rows have different padded and unsupervised lengths (so token counts differ by rank)."""
    batches = []
    for index in range(count):
        ids = token_batch(3, 20, seed=index)
        mask = torch.ones_like(ids)
        mask[0, -(index % 4 + 1):] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :index % 5 + 6] = -100  # the prompt
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


if __name__ == "__main__":
    out = Path(sys.argv[1])
    started = start_process_group()
    share = current_ranks().share(prompt_masked_batches(BATCHES))
    config = LoraConfig(rank=2, alpha=4, targets="all-linear")
    grads = estimate_gradients(tiny_llama(), share, targets=config, progress=False)
    fisher = estimate_fisher(tiny_llama(), share, targets=config, progress=False)
    # tau 1 never settles: every batch is folded, across the step boundaries of both ranks
    eva = {tau: estimate_eva(tiny_llama(), share, config, tau=tau, progress=False) for tau in (0.9, 1.0)}
    linears = {name: module.weight for name, module in tiny_llama().named_modules() if name.endswith("_proj")}
    costs = decomposition_costs(linears, {name: 2 for name in linears}, SMALL_GRID, max_iterations=3,
                                progress=False)  # every rank sweeps its share of the matrices
    if current_ranks().main:
        save_tensors(out / "lora_ga.safetensors", {**grads, "num_batches": torch.tensor(grads.num_batches)})
        save_tensors(out / "fisher.safetensors", fisher)
        save_tensors(out / "lq_lora_costs.safetensors", {"costs": torch.tensor(costs, dtype=torch.float64)})
        for tau, estimate in eva.items():
            estimate.save(out / f"eva-{tau}")
    if started:
        stop_process_group()
