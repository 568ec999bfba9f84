"""``lorakit xlora train|eval|generate|inspect``: X-LoRA from the command line."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.args import TASK_EVAL_N, add_train_arguments, example_count, train_config
from lorakit.errors import ConfigError, LorakitError
from lorakit.models import DEFAULT_MODEL

INSPECT_N = 32


def named_directories(pairs: list[str] | None, flag: str = "--expert") -> dict[str, str]:
    """``NAME=DIR`` values of ``flag`` as a dict, in order; each name once."""
    named: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} {pair!r} is not NAME=DIR")
        if name in named:
            raise ConfigError(f"{flag} names {name!r} twice")
        named[name] = path
    return named


def _xlora_config(args: argparse.Namespace):
    from lorakit.mixtures.xlora.config import XLoraConfig
    return XLoraConfig(layerwise_scalings=args.layerwise, top_k=args.top_k, enable_softmax_topk=args.softmax_topk,
                       depth=args.depth, size=args.size, softmax_temperature=args.temperature_softmax,
                       trainable_experts=args.trainable_experts, scaling_pass_value=args.scaling_pass_value,
                       global_scaling_weight=args.global_scaling_weight)


def _train(args: argparse.Namespace) -> None:
    from lorakit.jobs.xlora_mixture import resume_xlora, train_xlora
    if args.resume:
        result = resume_xlora(args.resume, progress=not args.quiet)
    else:
        if not args.data or not args.out:
            raise LorakitError("lorakit xlora train needs --expert NAME=DIR ..., --data and --out (or --resume DIR)")
        result = train_xlora(args.data, args.out, named_directories(args.expert), base=args.base,
                             xlora=_xlora_config(args),
                             config=train_config(args), n=args.n, eval_data=args.eval_data, bundle=args.bundle,
                             overwrite=args.overwrite, progress=not args.quiet)
    print(json.dumps(result.summary()))


def _eval(args: argparse.Namespace) -> None:
    from lorakit.jobs.xlora_mixture import evaluate_xlora
    result = evaluate_xlora(args.xlora, args.data, base=args.base, split=args.split,
                            n=example_count(args.data, args.n, TASK_EVAL_N),
                            batch_size=args.batch_size, progress=not args.json)
    print(json.dumps(result.metrics()) if args.json else
          f"exact match {result.exact_match:.1%} on {result.n} examples; loss {result.loss:.4f}")


def _generate(args: argparse.Namespace) -> None:
    from lorakit.jobs.xlora_mixture import generate_xlora
    for output in generate_xlora(args.xlora, args.prompt, base=args.base, max_new_tokens=args.max_new_tokens,
                                 reuse_prompt_scalings=args.reuse_prompt_scalings):
        print(output)


def _inspect(args: argparse.Namespace) -> None:
    from lorakit.data.source import load_examples
    from lorakit.mixtures.xlora.inspection import inspect_xlora
    from lorakit.jobs.xlora_mixture import load_xlora_model
    xmodel, tokenizer = load_xlora_model(args.xlora, base=args.base)
    examples = load_examples(args.data, split=args.split, n=example_count(args.data, args.n, INSPECT_N))
    report = inspect_xlora(xmodel, tokenizer, examples, args.prompt or examples[0], args.out_dir)
    print(json.dumps(report["mean_scalings"], indent=1))
    print(f"plots and scalings.json written to {args.out_dir}")


def _add_xlora_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("X-LoRA")
    group.add_argument("--layerwise", action="store_true", help="one scaling vector per adapted module")
    group.add_argument("--top-k", type=int, default=None, help="keep each token's k largest scalings (sparse)")
    group.add_argument("--softmax-topk", action="store_true", help="renormalise the kept scalings per token")
    group.add_argument("--depth", type=int, default=1, help="classifier depth (default: 1)")
    group.add_argument("--size", type=int, default=2048, help="classifier hidden width when depth > 1")
    group.add_argument("--temperature-softmax", type=float, default=1.0, help="softmax temperature")
    group.add_argument("--trainable-experts", action="store_true", help="train the experts too")
    group.add_argument("--scaling-pass-value", type=float, default=0.0, help="expert weight in the scaling pass")
    group.add_argument("--global-scaling-weight", type=float, default=1.0, help="multiplies every expert term")


def add_xlora_commands(commands) -> None:
    """Register ``lorakit xlora ...`` on the top-level subcommands."""
    xlora = commands.add_parser("xlora", help="X-LoRA: mix pre-trained LoRA experts per token and layer.",
                                description="X-LoRA: a classifier mixes pre-trained LoRA experts per token and layer.")
    actions = xlora.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--base", default=DEFAULT_MODEL, help="base model (default: %(default)s)")
        return sub

    train = action("train", _train, "Train an X-LoRA classifier over LoRA experts.")
    train.add_argument("--expert", action="append", metavar="NAME=DIR", help="an expert adapter; repeat")
    train.add_argument("--data", help="a JSONL file or task:NAME")
    train.add_argument("--out", help="run directory")
    train.add_argument("--n", type=int, default=None)
    train.add_argument("--eval-data", default=None)
    train.add_argument("--bundle", action="store_true", help="copy the experts into --out (self-contained)")
    train.add_argument("--resume", default=None, metavar="DIR")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--quiet", action="store_true")
    _add_xlora_options(train)
    add_train_arguments(train, include_full=False)

    evaluate = action("eval", _eval, "Exact match and loss of a saved X-LoRA model.")
    evaluate.add_argument("--xlora", required=True, help="saved X-LoRA directory")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--n", type=int, default=None, help=f"examples (default: all; task:NAME {TASK_EVAL_N})")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--json", action="store_true")

    generate = action("generate", _generate, "Generate with a saved X-LoRA model (both passes cached).")
    generate.add_argument("--xlora", required=True)
    generate.add_argument("--prompt", action="append", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--reuse-prompt-scalings", action="store_true",
                          help="one pass per new token, reusing the prompt's scalings (an approximation)")

    inspect = action("inspect", _inspect, "Mean scalings per layer x expert over data, and per token x expert "
                                          "for one prompt, as JSON and PNG heatmaps.")
    inspect.add_argument("--xlora", required=True)
    inspect.add_argument("--data", required=True, help="examples to average over (JSONL or task:NAME)")
    inspect.add_argument("--split", default="test", choices=["train", "test"])
    inspect.add_argument("--n", type=int, default=None, help=f"examples (default: all; task:NAME {INSPECT_N})")
    inspect.add_argument("--prompt", default=None, help="the prompt to show per token (default: the first example)")
    inspect.add_argument("--out-dir", required=True, help="where the PNGs and scalings.json go")
