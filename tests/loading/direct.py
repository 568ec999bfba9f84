"""Each kind loaded by its own function, not through ``lorakit.load``: what the loader is compared with."""

from __future__ import annotations

from pathlib import Path

from torch import nn

import lorakit
from lorakit.mixtures.meteora.storage import load_meteora
from lorakit.mixtures.mixlora import load_mixlora
from lorakit.mixtures.xlora import load_xlora

# The task adapters of the written MeteoRA directory: name -> directory under the root.
METEORA_ADAPTERS = {"copy": "adapter", "caps": "caps"}


def direct_model(kind: str, directory: Path, root: Path) -> nn.Module:
    """The model ``directory`` (of ``kind``, written under ``root`` by ``write_fixtures``) stands for, in eval mode."""
    if kind == "model":
        return lorakit.load_model(directory)[0]
    base = lorakit.load_model(root / "base")[0]
    if kind == "xlora":
        return load_xlora(base, directory).eval()
    if kind == "meteora":
        for name, path in METEORA_ADAPTERS.items():
            lorakit.load_adapter(base, root / path, name, activate=False)
        return load_meteora(base, directory).eval()
    if kind == "mixlora":
        load_mixlora(base, directory)
    else:
        lorakit.load_adapter(base, directory)
    return base
