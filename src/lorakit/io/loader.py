"""``lorakit.load``: the one door for every directory lorakit writes (and foreign PEFT adapters and models).

    loaded = lorakit.load("runs/x")             # the base the directory records, with what it holds
    loaded = lorakit.load("runs/x", model)      # into a model you have
    loaded.model(input_ids)                     # the adapter, mixture or model, ready to run

The directory's kind (``lorakit.json``, else its own metadata fields) picks the loader from the registry of
:mod:`lorakit.io.directory_kinds`; a directory nobody recognises is refused with what it holds.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit.io import adapter_kind, model_kind  # noqa: F401  (the kinds register themselves on import)
from lorakit.io.directory_kinds import Loaded, directory_kind


def load(path: str | Path, model: nn.Module | None = None) -> Loaded:
    """Load the directory at ``path`` into ``model``, or (None) into the base model it records.

    Returns a :class:`Loaded`: ``model`` to run (the base with the adapters, a mixture, or a whole
    model), the ``base`` it wraps, the ``tokenizer`` when the base was loaded here, and the names of the
    adapters the directory added."""
    directory = Path(path)
    return directory_kind(directory).load(directory, model)
