"""Interrupting a training run at a chosen step (for the resume tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lorakit.train import loop


def run_interrupted(monkeypatch: pytest.MonkeyPatch, at_step: int, run: Callable[[], object]) -> None:
    """Call ``run()`` with the training loop killed (KeyboardInterrupt) as it starts step ``at_step`` (0-based)."""
    real_step = loop._Run._step

    def crash(self, step):
        if step == at_step:
            raise KeyboardInterrupt
        return real_step(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(loop._Run, "_step", crash)
        with pytest.raises(KeyboardInterrupt):
            run()
