"""``lorakit meteora train|eval``: MeteoRA gates over task adapters from the command line; ``eval
--composite`` scores prompts that mix several tasks' questions."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.common import MIXTURE_TRAIN, TASK_EVAL_N, command, command_group, example_count
from lorakit.cli.flags import ConfigFlags
from lorakit.cli.torchrun_launch import train_in_process_group
from lorakit.cli.values import named_values
from lorakit.errors import ConfigError
from lorakit.jobs.meteora_mixture import evaluate_meteora, evaluate_meteora_composite, train_meteora
from lorakit.mixtures.meteora import MeteoraConfig

METEORA = ConfigFlags(MeteoraConfig)
COMPOSITE_N = 50


def _train(args: argparse.Namespace) -> None:
    train_in_process_group(lambda progress: train_meteora(
        args.data, args.out, named_values(args.adapter, "--adapter"), base=args.base, meteora=METEORA.build(args),
        config=MIXTURE_TRAIN.build(args), n=args.n, overwrite=args.overwrite, progress=progress), quiet=args.quiet)


def _eval(args: argparse.Namespace) -> None:
    if args.composite:
        result = evaluate_meteora_composite(args.meteora, args.composite.split(","), base=args.base,
                                            per_prompt=args.per_prompt, n=args.n or COMPOSITE_N,
                                            batch_size=args.batch_size)
    elif args.data:
        result = evaluate_meteora(args.meteora, args.data, base=args.base,
                                  n=example_count(args.data, args.n, TASK_EVAL_N), batch_size=args.batch_size)
    else:
        raise ConfigError("lorakit meteora eval needs --data (or --composite TASK,TASK)")
    print(json.dumps(result.metrics()))


def register(commands) -> None:
    actions = command_group(commands, "meteora", "MeteoRA: a gate per adapted linear over task adapters.")
    train = command(actions, "train", _train, "Train MeteoRA gates on JSONL data whose \"task\" names an adapter.",
                    configs=(METEORA, MIXTURE_TRAIN))
    train.add_argument("--adapter", action="append", required=True, metavar="TASK=DIR",
                       help="a task adapter (PEFT format) named like the data's task values; repeat")
    train.add_argument("--data", required=True, help="JSONL with a \"task\" field per example")
    train.add_argument("--out", required=True)
    train.add_argument("--n", type=int, default=None)
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--quiet", action="store_true")

    evaluate = command(actions, "eval", _eval, "Exact match and loss of a trained MeteoRA model "
                                              "(lorakit eval --adapter reads it too).", base="recorded")
    evaluate.add_argument("--meteora", required=True, help="the run directory of lorakit meteora train")
    evaluate.add_argument("--data", default=None, help="a JSONL file or task:NAME")
    evaluate.add_argument("--composite", default=None, metavar="TASK,TASK",
                          help="instead of --data: prompts mixing questions of these built-in tasks, each "
                               "answer scored with its own task's metric")
    evaluate.add_argument("--per-prompt", type=int, default=2, help="questions per composite prompt")
    evaluate.add_argument("--n", type=int, default=None,
                          help=f"examples (default: all; task:NAME {TASK_EVAL_N}; --composite {COMPOSITE_N} prompts)")
    evaluate.add_argument("--batch-size", type=int, default=16)
