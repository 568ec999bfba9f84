"""``lorakit train``: fine-tune one adapter, several in shared batches (``--data NAME=DATA``), or every weight.

    lorakit train --data task:reverse --out runs/r --steps 60
    lorakit train --data copy=copy.jsonl --data upper=task:caps --out runs/two
    lorakit train --resume runs/r
    lorakit train --data task:reverse --out runs/lq --init lq-lora --bits 2.75 --fisher-batches 8
    lorakit train --data task:reverse --out runs/q --quantize nf4
    lorakit train --data task:reverse --out runs/p --loram-ratio 0.5 --loram-align-steps 50   # LoRAM
    lorakit train --data task:reverse --out runs/d --nproc 2          # = torchrun --nproc_per_node 2 -m lorakit train
"""

from __future__ import annotations

import argparse
import dataclasses

from lorakit.cli.common import LORA, TRAIN, command
from lorakit.cli.flags import ConfigFlags
from lorakit.cli.torchrun_launch import gave_flag, run_torchrun, train_in_process_group
from lorakit.cli.values import named_values, split_name
from lorakit.config import DATA_DRIVEN_INITS, INITS, LoraConfig, LoramConfig, QuantizedInitConfig
from lorakit.errors import LorakitError
from lorakit.jobs.finetune import finetune, finetune_adapters, resume_finetune
from lorakit.quant.base_schemes import SCHEMES
from lorakit.train.distributed import DEFAULT_TIMEOUT_S, launched_by_torchrun

QUANTIZED_INIT = ConfigFlags(QuantizedInitConfig, spellings={"iterations": "--quant-iterations",
                                                             "grid": "--quant-grid"})
"""The flags of ``--init lq-lora`` and ``--init loftq``."""
LORAM = ConfigFlags(LoramConfig, spellings={f.name: "--loram-" + f.name.replace("_", "-")
                                            for f in dataclasses.fields(LoramConfig)})
"""The flags of LoRAM (``--loram-ratio`` turns it on)."""


def _train(args: argparse.Namespace) -> None:
    if args.nproc is not None:
        if launched_by_torchrun():
            raise LorakitError("--nproc launches torchrun itself; under torchrun, leave it out")
        run_torchrun(args.nproc, args.argv)
        return
    train_in_process_group(lambda progress: _run(args, progress), quiet=args.quiet, timeout_s=args.dist_timeout)


def _run(args: argparse.Namespace, progress: bool):
    if args.resume:
        grad_accum = args.grad_accum if gave_flag(args.argv, "--grad-accum") else None
        return resume_finetune(args.resume, progress=progress, grad_accum=grad_accum)
    if not args.data or not args.out:
        raise LorakitError("lorakit train needs --data and --out (or --resume DIR)")
    if len(args.data) == 1 and split_name(args.data[0])[0] is None:
        return finetune(args.data[0], args.out, base=args.base, lora=_lora(args), config=TRAIN.build(args),
                        n=args.n, eval_data=args.eval_data, overwrite=args.overwrite, progress=progress,
                        quantized_init=QUANTIZED_INIT.build(args), quantize=args.quantize, loram=LORAM.build(args))
    if args.init in DATA_DRIVEN_INITS or args.eval_data or args.ratio is not None:
        raise LorakitError("several adapters in one batch train without a data-driven init, --eval-data or "
                           "--loram-ratio")
    datasets = named_values(args.data, "--data", "DATA (to train several adapters, name every --data)")
    return finetune_adapters(datasets, args.out, base=args.base, lora=_lora(args), config=TRAIN.build(args),
                             n=args.n, overwrite=args.overwrite, progress=progress, quantize=args.quantize)


def _lora(args: argparse.Namespace) -> LoraConfig:
    return dataclasses.replace(LORA.build(args), init=args.init)


def register(commands) -> None:
    train = command(commands, "train", _train, "Fine-tune a LoRA adapter (or, with --full, every weight).",
                    configs=(LORA, TRAIN, QUANTIZED_INIT, LORAM))
    train.set_defaults(argv=())  # lorakit.cli.main sets the command line as given
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
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train on N data-parallel processes of this machine (launches torchrun; the global batch "
                            "is batch-size x grad-accum x N)")
    train.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others before the run fails "
                            "(default: %(default)s)")
    train.add_argument("--quantize", default=None, choices=list(SCHEMES), metavar="SCHEME",
                       help="quantize the frozen base as it loads and train on it (QLoRA); the adapter records it: "
                            + "; ".join(f"{name}: {scheme.summary}" for name, scheme in SCHEMES.items()))
    train.add_argument("--init", default=LoraConfig().init, choices=list(INITS), metavar="INIT",
                       help="how the adapter starts (LoraConfig.init): "
                            + "; ".join(f"{name}: {summary}" for name, summary in INITS.items())
                            + " (default: %(default)s)")
