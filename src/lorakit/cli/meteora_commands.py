"""``lorakit meteora train|eval``: MeteoRA gates over task adapters from the command line; ``eval
--composite`` scores prompts that mix several tasks' questions."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.args import TASK_EVAL_N, add_train_arguments, example_count, train_config
from lorakit.cli.xlora_commands import named_directories
from lorakit.errors import ConfigError


def _train(args: argparse.Namespace) -> None:
    from lorakit.mixtures.meteora import MeteoraConfig
    from lorakit.jobs.meteora_mixture import train_meteora
    meteora = MeteoraConfig(top_k=args.top_k, temperature=args.temperature, task_loss_weight=args.task_loss_weight,
                            train_adapters=args.train_adapters)
    result = train_meteora(args.data, args.out, named_directories(args.adapter, "--adapter"), base=args.base,
                           meteora=meteora, config=train_config(args), n=args.n, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(json.dumps(result.summary()))


def _eval(args: argparse.Namespace) -> None:
    from lorakit.jobs.meteora_mixture import evaluate_meteora, evaluate_meteora_composite
    if args.composite:
        result = evaluate_meteora_composite(args.meteora, args.composite.split(","), base=args.base,
                                            per_prompt=args.per_prompt, n=args.n or 50, batch_size=args.batch_size)
        print(json.dumps(result.metrics()))
        return
    if not args.data:
        raise ConfigError("lorakit meteora eval needs --data (or --composite TASK,TASK)")
    result = evaluate_meteora(args.meteora, args.data, base=args.base, n=example_count(args.data, args.n, TASK_EVAL_N),
                              batch_size=args.batch_size)
    print(json.dumps(result.metrics()))


def add_meteora_commands(commands, command) -> None:
    """``lorakit meteora train`` and ``lorakit meteora eval``."""
    meteora = commands.add_parser("meteora", help="MeteoRA: a gate per adapted linear over task adapters.")
    actions = meteora.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = command(actions, "train", _train, "Train MeteoRA gates on JSONL data whose \"task\" names an adapter.")
    train.add_argument("--adapter", action="append", required=True, metavar="TASK=DIR",
                       help="a task adapter (PEFT format) named like the data's task values; repeat")
    train.add_argument("--data", required=True, help="JSONL with a \"task\" field per example")
    train.add_argument("--out", required=True)
    train.add_argument("--n", type=int, default=None)
    train.add_argument("--top-k", type=int, default=2)
    train.add_argument("--temperature", type=float, default=1.0)
    train.add_argument("--task-loss-weight", type=float, default=1.0,
                       help="lambda of the gates' task cross-entropy (the released code uses 50)")
    train.add_argument("--train-adapters", action="store_true", help="train the adapters too (default: gates only)")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--quiet", action="store_true")
    add_train_arguments(train, include_full=False)
    evaluate = command(actions, "eval", _eval, "Exact match and loss of a trained MeteoRA model.")
    evaluate.add_argument("--meteora", required=True, help="the run directory of lorakit meteora train")
    evaluate.add_argument("--data", default=None, help="a JSONL file or task:NAME")
    evaluate.add_argument("--composite", default=None, metavar="TASK,TASK",
                          help="instead of --data: prompts mixing questions of these built-in tasks, each "
                               "answer scored with its own task's metric")
    evaluate.add_argument("--per-prompt", type=int, default=2, help="questions per composite prompt")
    evaluate.add_argument("--n", type=int, default=None)
    evaluate.add_argument("--batch-size", type=int, default=16)
