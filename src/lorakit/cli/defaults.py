"""The command line's own defaults, where they differ from the config dataclasses', and why.

Everything else a flag defaults to is the dataclass field's default (:mod:`lorakit.cli.flags`), and
``--help`` shows both values for the settings below.
"""

from __future__ import annotations

from typing import Any

from lorakit.config import LoraConfig, TrainConfig

CLI_DEFAULTS: dict[type, dict[str, Any]] = {
    # LoraConfig keeps PEFT's r = 8, alpha = 8, so that LoraConfig() means what peft.LoraConfig() means.
    # A command-line run is a training run, and r = 16 with alpha = 2r is what trains our tasks well.
    LoraConfig: {"rank": 16, "alpha": 32.0},
    # A library call changes nothing process-wide unless asked; a command owns its process, so it asks.
    TrainConfig: {"keep_freed_memory": True},
}
"""Per config class: field -> the default of its flag."""
