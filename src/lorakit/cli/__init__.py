"""The ``lorakit`` command: one module per command group, each command a thin call of a job or function."""

from lorakit.cli.main import main

__all__ = ["main"]
