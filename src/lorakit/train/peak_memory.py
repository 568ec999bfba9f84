"""The peak resident memory of this process, as ``lorakit train`` reports it and ``lorakit compare`` reads it.

Linux's ``VmHWM`` (``/proc/self/status``): the high-water mark of the memory the process's own program has held,
which starts afresh when a process runs a new program. ``getrusage``'s ``ru_maxrss`` does not: it keeps the mark
from before ``exec``, so a training process started by a large parent (a comparison that has evaluated models in
between) would report at least the parent's size. Where there is no ``/proc``, ``ru_maxrss`` it is (KiB on
Linux and the BSDs, bytes on macOS).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_resident_mib() -> float:
    """This process's peak resident memory so far, in MiB (module docstring)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak() -> bool:
    """Start this process's peak resident memory afresh from its current size (Linux: ``5`` written to
    ``/proc/self/clear_refs`` resets ``VmHWM``), so that a later :func:`peak_resident_mib` measures what follows;
    False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
