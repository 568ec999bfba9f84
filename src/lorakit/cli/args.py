"""Command-line flags shared by several subcommands, and the configs they build."""

from __future__ import annotations

import argparse

from lorakit.config import ALL_LINEAR, LoraConfig, TrainConfig

TASK_EVAL_N = 100
"""Held-out examples an evaluation scores for a built-in task unless ``--n`` says otherwise."""


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter")
    group.add_argument("--rank", type=int, default=16, help="LoRA rank r (default: %(default)s)")
    group.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; scale = alpha / r (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input (default: 0)")
    group.add_argument("--targets", default=ALL_LINEAR,
                       help="'all-linear', a comma-separated list of module names, or re:REGEX (default: %(default)s)")
    group.add_argument("--rslora", action="store_true", help="rank-stabilised scale alpha / sqrt(r)")


def add_init_argument(parser: argparse.ArgumentParser) -> None:
    from lorakit.train.prepare import INITS
    parser.add_argument("--init", default="kaiming", choices=INITS,
                        help="adapter initialisation: kaiming (A Kaiming-uniform, B = 0), gaussian, lora-ga "
                             "(LoRA-GA: from the gradient on the first batches) or eva (EVA: from the "
                             "activations' principal components, ranks redistributed) (default: %(default)s)")


def add_train_arguments(parser: argparse.ArgumentParser, *, include_full: bool = True) -> None:
    group = parser.add_argument_group("training")
    length = group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data, instead of --steps")
    group.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (default: %(default)s)")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    group.add_argument("--max-length", type=int, default=256, help="truncate examples to this many tokens")
    group.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--max-grad-norm", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--eval-every", type=int, default=0, help="evaluation loss every N steps (0: at the end)")
    group.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    group.add_argument("--log-every", type=int, default=10, help="metrics.jsonl line every N steps (default: 10)")
    group.add_argument("--pack", action="store_true", help="pack short examples into full-length rows")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model body for training (minutes of compiling first)")
    if include_full:
        group.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (a baseline)")
        add_method_arguments(parser)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.train.components import METHODS, OPTIMIZERS, REGULARIZERS
    group = parser.add_argument_group("method (see docs/METHODS.md for what combines)")
    group.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                       help="; ".join(f"{k}: {c.summary}" for k, c in OPTIMIZERS.items()))
    group.add_argument("--method", default="lora", choices=list(METHODS),
                       help="; ".join(f"{k}: {c.summary}" for k, c in METHODS.items()))
    group.add_argument("--regularizer", default=None, choices=list(REGULARIZERS),
                       help="; ".join(f"{k}: {c.summary}" for k, c in REGULARIZERS.items()))
    group.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", type=_option,
                       help="a setting of the chosen optimizer/method/regularizer, e.g. allora_eta=2 or "
                            "dylora_frozen=true (repeatable)")


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return key.strip(), lowered == "true"
    try:
        number = float(value)
    except ValueError:
        return key.strip(), value.strip()
    return key.strip(), int(number) if number.is_integer() and "." not in value and "e" not in lowered else number


def _targets(text: str) -> str | tuple[str, ...]:
    if text == ALL_LINEAR:
        return text
    if text.startswith("re:"):
        return text[3:]
    return tuple(t.strip() for t in text.split(",") if t.strip())


def lora_config(args: argparse.Namespace) -> LoraConfig:
    return LoraConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=_targets(args.targets),
                      use_rslora=args.rslora)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, max_length=args.max_length, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                       eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every, pack=args.pack,
                       full=getattr(args, "full", False), optimizer=getattr(args, "optimizer", "adamw"),
                       method=getattr(args, "method", "lora"), regularizer=getattr(args, "regularizer", None),
                       options=dict(getattr(args, "option", [])), compile=args.compile)


def example_count(data: str, n: int | None, task_default: int) -> int | None:
    """How many examples a command reads: ``n`` if given, else all of a JSONL file or ``task_default``
    of a built-in task (whose splits hold thousands)."""
    if n is not None or not data.startswith("task:"):
        return n
    return task_default
