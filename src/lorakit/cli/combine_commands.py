"""``lorakit combine``: one adapter from several, exactly (``cat``), truncated (``svd``) or as factor sums
where those are exact (``linear``); see :mod:`lorakit.combine`.

    lorakit combine --adapter runs/a --adapter runs/b=-0.5 --mode cat --out runs/c
    lorakit combine --adapter runs/a=0.7 --adapter runs/b=0.3 --mode svd --rank 8 --out runs/c8
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from lorakit.cli.common import command
from lorakit.combine import combine_adapters
from lorakit.combine.combine import MODES
from lorakit.errors import ConfigError


def adapter_argument(text: str) -> tuple[str, float]:
    """``PATH`` (weight 1) or ``PATH=WEIGHT``; the weight follows the last ``=``, unless ``text`` as a whole
    is an existing path (a run directory ``runs/lr=1e-3`` is that directory at weight 1; write ``PATH=1``
    for a path holding ``=`` that does not exist yet)."""
    path, separator, weight = text.rpartition("=")
    if not separator or Path(text).exists():
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ConfigError(f"--adapter {text!r}: the weight after '=' must be a number "
                          f"(for a path containing '=', write {text + '=1'!r})") from None
    if not path or not math.isfinite(value):
        raise ConfigError(f"--adapter {text!r}: PATH=WEIGHT with a finite weight is required")
    return path, value


def _cmd_combine(args: argparse.Namespace) -> None:
    adapters = [adapter_argument(text) for text in args.adapter]
    report = combine_adapters(adapters, args.out, mode=args.mode, rank=args.rank,
                              allow_different_bases=args.allow_different_bases, overwrite=args.overwrite)
    print(json.dumps(report.to_dict(), indent=2))


def register(commands) -> None:
    combine = command(commands, "combine", _cmd_combine,
                      "Combine adapters into one: sum_i w_i s_i B_i A_i per module.", base=False)
    combine.add_argument("--adapter", action="append", required=True, metavar="PATH[=WEIGHT]",
                         help="an adapter directory and its weight (default 1; negative subtracts); repeat")
    combine.add_argument("--mode", default="cat", choices=sorted(MODES),
                         help="cat: exact, ranks add (default); svd: exact delta truncated to --rank, error "
                              "reported; linear: factor sums, only where exact (shared A or B)")
    combine.add_argument("--rank", type=int, default=None, help="svd: the rank to keep")
    combine.add_argument("--out", required=True, help="the new adapter directory")
    combine.add_argument("--overwrite", action="store_true", help="allow --out to be a non-empty directory")
    combine.add_argument("--allow-different-bases", action="store_true",
                         help="combine adapters whose configs name different base models")
