"""Long comparisons in resumable stages: a finished stage leaves ``stage.json`` and is not run again."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.io.files import save_json

STAGE_FILE = "stage.json"


def run_stage(directory: str | Path, run: Callable[[], dict[str, Any]],
              report: Callable[[str], Any] = print) -> dict[str, Any]:
    """``run()``'s record (plus its ``seconds``), computed once: when ``directory`` holds a finished
    stage's ``stage.json`` that record is read back instead, so an interrupted comparison resumes."""
    marker = Path(directory) / STAGE_FILE
    if marker.is_file():
        report(f"reusing {directory}")
        return json.loads(marker.read_text())
    started = time.perf_counter()
    record = {**run(), "seconds": round(time.perf_counter() - started, 1)}
    save_json(marker, record)
    return record
