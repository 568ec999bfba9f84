"""What several command groups share: how a command is declared, and the flags of the training configs."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence

from lorakit.cli.flags import ConfigFlags
from lorakit.cli.values import module_names
from lorakit.config import LoraConfig, TrainConfig
from lorakit.models import DEFAULT_MODEL
from lorakit.train.components import METHODS, OPTIMIZERS, REGULARIZERS

TASK_EVAL_N = 100
"""Held-out examples an evaluation scores for a built-in task unless ``--n`` says otherwise."""

LORA = ConfigFlags(LoraConfig, exclude=("init",), spellings={"use_rslora": "--rslora"},
                   parsers={"targets": module_names, "exclude": module_names})
"""The adapter's flags (``init`` is ``lorakit train --init``, which also offers the data-driven inits)."""

SPARSE_CHUNK_ESTIMATES = {
    "paper": "exactly K chunks, weights N/K (the paper; cross-chunk terms shrink by N(K-1)/(K(N-1)))",
    "unbiased": "each chunk with probability K/N, weights N/K (expected gradient: SeCO's)",
}

TRAIN = ConfigFlags(TrainConfig, spellings={"options": "--option"},
                    choices={**{name: {key: entry.summary for key, entry in registry.items()}
                                for name, registry in (("optimizer", OPTIMIZERS), ("method", METHODS),
                                                       ("regularizer", REGULARIZERS))},
                             "sparse_chunk_estimator": SPARSE_CHUNK_ESTIMATES})
"""The training run's flags."""

MIXTURE_TRAIN = dataclasses.replace(TRAIN, exclude=("full", "optimizer", "method", "regularizer", "options",
                                                   "chunk_size", "sparse_chunks", "sparse_chunk_estimator"))
"""The training flags of a mixture's own training (``xlora train``, ``meteora train``): no method to choose, and
no chunk-wise training (X-LoRA runs the base twice per forward)."""


def command(commands, name: str, handler: Callable[[argparse.Namespace], None], help_text: str, *,
            base: bool | str = True, configs: Sequence[ConfigFlags] = ()) -> argparse.ArgumentParser:
    """A subcommand running ``handler(args)``, with ``--base`` unless ``base=False`` and the flags of ``configs``
    (recorded as the parser's ``config_flags`` default, for the tests that compare them with the library).
    ``base="recorded"``: the command reads a directory, whose recorded base is the default."""
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler, prog=sub.prog, config_flags=tuple(configs))
    if base == "recorded":
        sub.add_argument("--base", default=None,
                         help=f"base model: {DEFAULT_MODEL!r}, a local directory or a hub id (default: the base the "
                              f"directory records; {DEFAULT_MODEL!r} without a directory)")
    elif base:
        sub.add_argument("--base", default=DEFAULT_MODEL,
                         help=f"base model: {DEFAULT_MODEL!r}, a local directory or a hub id (default: %(default)s)")
    for flags in configs:
        flags.add(sub)
    return sub


def command_group(commands, name: str, help_text: str):
    """A subcommand whose actions are subcommands themselves (``lorakit xlora train``)."""
    group = commands.add_parser(name, help=help_text, description=help_text)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


def example_count(data: str, n: int | None, task_default: int) -> int | None:
    """How many examples a command reads: ``n`` if given, else all of a JSONL file or ``task_default``
    of a built-in task (whose splits hold thousands)."""
    if n is not None or not data.startswith("task:"):
        return n
    return task_default
