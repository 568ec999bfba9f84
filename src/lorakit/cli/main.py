"""The ``lorakit`` command: one module per command group (``lorakit <command> --help`` for each); the flags of
the config dataclasses are generated from them (:mod:`lorakit.cli.flags`). A command exits 0, 2 on a
lorakit error (the message on stderr) and 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lorakit.cli import (
    adapter_commands,
    analyze_commands,
    combine_commands,
    demo_commands,
    export_commands,
    meteora_commands,
    method_commands,
    serve_commands,
    tasks_commands,
    train_commands,
    xlora_commands,
)
from lorakit.errors import LorakitError

GROUPS = (train_commands, adapter_commands, tasks_commands, demo_commands, xlora_commands, method_commands,
          meteora_commands, combine_commands, analyze_commands, serve_commands, export_commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA adapters: train, evaluate, generate, merge.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = demo_commands.with_default_demo(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = list(argv)  # the command as given (lorakit train --nproc runs it again under torchrun)
    try:
        args.handler(args)
    except LorakitError as err:
        print(f"{args.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
