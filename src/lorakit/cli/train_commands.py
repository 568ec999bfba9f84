"""``lorakit train``: fine-tune one adapter, several in shared batches (``--data NAME=DATA``), or every weight.

    lorakit train --data task:reverse --out runs/r --steps 60
    lorakit train --data copy=copy.jsonl --data upper=task:caps --out runs/two
    lorakit train --resume runs/r
"""

from __future__ import annotations

import argparse
import json

from lorakit.cli.common import LORA, TRAIN, command
from lorakit.cli.values import named_values, split_name
from lorakit.errors import LorakitError
from lorakit.jobs.finetune import finetune, finetune_adapters, resume_finetune
from lorakit.train.prepare import INITS

DEFAULT_INIT = "kaiming"


def _train(args: argparse.Namespace) -> None:
    if args.resume:
        result = resume_finetune(args.resume, progress=not args.quiet)
    elif not args.data or not args.out:
        raise LorakitError("lorakit train needs --data and --out (or --resume DIR)")
    elif len(args.data) == 1 and split_name(args.data[0])[0] is None:
        result = finetune(args.data[0], args.out, base=args.base, lora=LORA.build(args), config=TRAIN.build(args),
                          n=args.n, eval_data=args.eval_data, init=args.init, overwrite=args.overwrite,
                          progress=not args.quiet)
    else:
        if args.init != DEFAULT_INIT or args.eval_data:
            raise LorakitError("several adapters in one batch train from the default init, without --eval-data")
        datasets = named_values(args.data, "--data", "DATA (to train several adapters, name every --data)")
        result = finetune_adapters(datasets, args.out, base=args.base, lora=LORA.build(args), config=TRAIN.build(args),
                                   n=args.n, overwrite=args.overwrite, progress=not args.quiet)
    print(json.dumps(result.summary()))


def register(commands) -> None:
    train = command(commands, "train", _train, "Fine-tune a LoRA adapter (or, with --full, every weight).",
                    configs=(LORA, TRAIN))
    train.add_argument("--data", action="append", help="training data: a JSONL file or task:NAME; repeat as "
                                                        "NAME=DATA to train one adapter per NAME in shared batches")
    train.add_argument("--out", help="run directory: the adapter (or one directory per NAME), metrics.jsonl, "
                                     "checkpoints/")
    train.add_argument("--n", type=int, default=None, help="examples to use (task:NAME default: 1000)")
    train.add_argument("--eval-data", default=None, help="evaluation data for the periodic and final loss")
    train.add_argument("--resume", default=None, metavar="DIR",
                       help="continue the run in DIR from its newest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="allow --out to hold an earlier run")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--init", default=DEFAULT_INIT, choices=INITS,
                       help="adapter initialisation: kaiming (A Kaiming-uniform, B = 0), gaussian, lora-ga "
                            "(LoRA-GA: from the gradient on the first batches) or eva (EVA: from the "
                            "activations' principal components, ranks redistributed) (default: %(default)s)")
