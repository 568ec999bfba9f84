"""``lorakit xlora train|eval|generate|inspect``: X-LoRA from the command line."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.common import MIXTURE_TRAIN, TASK_EVAL_N, command, command_group, example_count
from lorakit.cli.flags import ConfigFlags
from lorakit.cli.torchrun_launch import train_in_process_group
from lorakit.cli.values import named_values
from lorakit.data.source import load_examples
from lorakit.errors import LorakitError
from lorakit.jobs.xlora_mixture import evaluate_xlora, generate_xlora, load_xlora_model, resume_xlora, train_xlora
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.inspection import inspect_xlora

INSPECT_N = 32
XLORA = ConfigFlags(XLoraConfig, spellings={"layerwise_scalings": "--layerwise",
                                            "enable_softmax_topk": "--softmax-topk",
                                            "softmax_temperature": "--temperature-softmax"})


def _train(args: argparse.Namespace) -> None:
    if not args.resume and (not args.data or not args.out):
        raise LorakitError("lorakit xlora train needs --expert NAME=DIR ..., --data and --out (or --resume DIR)")

    def run(progress: bool):
        if args.resume:
            return resume_xlora(args.resume, progress=progress)
        return train_xlora(args.data, args.out, named_values(args.expert or [], "--expert"), base=args.base,
                           xlora=XLORA.build(args), config=MIXTURE_TRAIN.build(args), n=args.n,
                           eval_data=args.eval_data, bundle=args.bundle, overwrite=args.overwrite, progress=progress)

    train_in_process_group(run, quiet=args.quiet)


def _eval(args: argparse.Namespace) -> None:
    result = evaluate_xlora(args.xlora, args.data, base=args.base, split=args.split,
                            n=example_count(args.data, args.n, TASK_EVAL_N),
                            batch_size=args.batch_size, progress=not args.json)
    print(json.dumps(result.metrics()) if args.json else
          f"exact match {result.exact_match:.1%} on {result.n} examples; loss {result.loss:.4f}")


def _generate(args: argparse.Namespace) -> None:
    for output in generate_xlora(args.xlora, args.prompt, base=args.base, max_new_tokens=args.max_new_tokens,
                                 reuse_prompt_scalings=args.reuse_prompt_scalings):
        print(output)


def _inspect(args: argparse.Namespace) -> None:
    xmodel, tokenizer = load_xlora_model(args.xlora, base=args.base)
    examples = load_examples(args.data, split=args.split, n=example_count(args.data, args.n, INSPECT_N))
    report = inspect_xlora(xmodel, tokenizer, examples, args.prompt or examples[0], args.out_dir)
    print(json.dumps(report["mean_scalings"], indent=1))
    print(f"plots and scalings.json written to {args.out_dir}")


def register(commands) -> None:
    actions = command_group(commands, "xlora",
                            "X-LoRA: a classifier mixes pre-trained LoRA experts per token and layer.")
    train = command(actions, "train", _train, "Train an X-LoRA classifier over LoRA experts.",
                    configs=(XLORA, MIXTURE_TRAIN))
    train.add_argument("--expert", action="append", metavar="NAME=DIR", help="an expert adapter; repeat")
    train.add_argument("--data", help="a JSONL file or task:NAME")
    train.add_argument("--out", help="run directory")
    train.add_argument("--n", type=int, default=None)
    train.add_argument("--eval-data", default=None)
    train.add_argument("--bundle", action="store_true", help="copy the experts into --out (self-contained)")
    train.add_argument("--resume", default=None, metavar="DIR")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--quiet", action="store_true")

    evaluate = command(actions, "eval", _eval, "Exact match and loss of a saved X-LoRA model "
                                              "(lorakit eval --adapter reads it too).", base="recorded")
    evaluate.add_argument("--xlora", required=True, help="saved X-LoRA directory")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--n", type=int, default=None, help=f"examples (default: all; task:NAME {TASK_EVAL_N})")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--json", action="store_true")

    generate = command(actions, "generate", _generate, "Generate with a saved X-LoRA model (both passes cached).",
                       base="recorded")
    generate.add_argument("--xlora", required=True)
    generate.add_argument("--prompt", action="append", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--reuse-prompt-scalings", action="store_true",
                          help="one pass per new token, reusing the prompt's scalings (an approximation)")

    inspect = command(actions, "inspect", _inspect, "Mean scalings per layer x expert over data, and per token x "
                                                    "expert for one prompt, as JSON and PNG heatmaps.",
                      base="recorded")
    inspect.add_argument("--xlora", required=True)
    inspect.add_argument("--data", required=True, help="examples to average over (JSONL or task:NAME)")
    inspect.add_argument("--split", default="test", choices=["train", "test"])
    inspect.add_argument("--n", type=int, default=None, help=f"examples (default: all; task:NAME {INSPECT_N})")
    inspect.add_argument("--prompt", default=None, help="the prompt to show per token (default: the first example)")
    inspect.add_argument("--out-dir", required=True, help="where the PNGs and scalings.json go")
