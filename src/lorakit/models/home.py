"""Where lorakit keeps its files on disk."""

from __future__ import annotations

import os
from pathlib import Path


def lorakit_home() -> Path:
    """Return lorakit's data directory: ``$LORAKIT_HOME`` if set, else ``~/.cache/lorakit``.

    The directory is not created here; whoever writes into it creates what it needs.
    """
    configured = os.environ.get("LORAKIT_HOME")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "lorakit"
