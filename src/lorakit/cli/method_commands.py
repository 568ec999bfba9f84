"""Subcommands for the training methods: ``compare``, ``dylora eval|export`` and ``continual``.

    lorakit compare --data task:date --out runs/compare -- --steps 40 --lr 1e-3
    lorakit dylora eval --adapter runs/dy --data task:date --ranks 1,4,16
    lorakit dylora export --adapter runs/dy --rank 4 --out runs/dy-r4
    lorakit continual --tasks caps,date,units --out runs/cl --method codyra --steps 60
"""

from __future__ import annotations

import argparse
import json

from lorakit.cli.common import LORA, TASK_EVAL_N, TRAIN, command
from lorakit.errors import ConfigError
from lorakit.jobs.compare import compare_methods
from lorakit.jobs.compare_report import results_table
from lorakit.jobs.continual import continual_finetune
from lorakit.jobs.evaluate import evaluate_adapter_ranks
from lorakit.jobs.method_runs import DEFAULT_METHODS, PRESETS
from lorakit.methods.dylora import truncate_adapter


def _compare(args: argparse.Namespace) -> None:
    flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    results = compare_methods(args.data, args.out, methods=args.methods.split(","), train_flags=flags,
                              eval_n=args.eval_n, target_loss=args.target_loss, base=args.base)
    print(results_table(results, args.target_loss))


def _dylora(args: argparse.Namespace) -> None:
    if args.action == "export":
        if args.rank is None or args.out is None:
            raise ConfigError("lorakit dylora export needs --rank and --out")
        print(truncate_adapter(args.adapter, args.rank, args.out))
        return
    if args.data is None:
        raise ConfigError("lorakit dylora eval needs --data (a JSONL file or task:NAME)")
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    results = evaluate_adapter_ranks(args.adapter, args.data, base=args.base, ranks=ranks, n=args.n,
                                     batch_size=args.batch_size)
    print(json.dumps({str(rank): result.metrics() for rank, result in results.items()}, indent=2))


def _continual(args: argparse.Namespace) -> None:
    result = continual_finetune(args.tasks.split(","), args.out, base=args.base, lora=LORA.build(args),
                                config=TRAIN.build(args), n=args.n, eval_n=args.eval_n, progress=not args.quiet)
    print(json.dumps(result.to_dict()))


def register(commands) -> None:
    compare = command(commands, "compare", _compare, "Train several methods with one budget and compare them.")
    compare.add_argument("--data", required=True, help="a JSONL file or task:NAME")
    compare.add_argument("--out", required=True, help="directory: one run per method, results.json, methods.md, "
                                                      "loss_curves.png")
    compare.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                         help=f"comma-separated, of {', '.join(PRESETS)} (default: %(default)s)")
    compare.add_argument("--eval-n", type=int, default=50, help="held-out examples scored per method")
    compare.add_argument("--target-loss", type=float, default=0.5, help="report the steps to reach this loss")
    compare.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: flags for every lorakit train")

    dylora = command(commands, "dylora", _dylora, "Evaluate a DyLoRA adapter at several ranks, or export one rank.",
                     base="recorded")
    dylora.add_argument("action", choices=["eval", "export"])
    dylora.add_argument("--adapter", required=True)
    dylora.add_argument("--data", default=None, help="eval: a JSONL file or task:NAME")
    dylora.add_argument("--ranks", default=None, help="eval: comma-separated ranks (default: every rank)")
    dylora.add_argument("--n", type=int, default=TASK_EVAL_N, help="eval: examples (default: %(default)s)")
    dylora.add_argument("--batch-size", type=int, default=16)
    dylora.add_argument("--rank", type=int, default=None, help="export: the rank to keep")
    dylora.add_argument("--out", default=None, help="export: the new adapter directory")

    continual = command(commands, "continual", _continual,
                        "Train a sequence of built-in tasks one after another (CoDyRA's protocol).",
                        configs=(LORA, TRAIN))
    continual.add_argument("--tasks", required=True, help="comma-separated built-in task names, in order")
    continual.add_argument("--out", required=True, help="directory: one adapter per task and continual.json")
    continual.add_argument("--n", type=int, default=None, help="training examples per task (default: 1000)")
    continual.add_argument("--eval-n", type=int, default=50, help="held-out examples per task")
    continual.add_argument("--quiet", action="store_true")
