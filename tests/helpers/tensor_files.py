"""Reading and rewriting safetensors files in tests that damage them on purpose."""

from __future__ import annotations

from collections.abc import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def read_tensors(path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` copied out of the file's memory map, so that the file can be rewritten."""
    return {key: value.clone() for key, value in load_file(str(path)).items()}


def rewrite_tensors(path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``change`` to the tensors of ``path`` and write them back with the file's metadata."""
    tensors = read_tensors(path)
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)
