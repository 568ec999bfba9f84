"""The ``lorakit`` command: each subcommand is a thin call of one public function.

    lorakit demo                                   train and compare on a built-in task
    lorakit train --data task:reverse --out runs/r  fine-tune (LoRA, or --full)
    lorakit eval --data task:reverse --adapter runs/r --json
    lorakit generate --adapter runs/r --prompt "..."
    lorakit merge --adapter runs/r --out merged/
    lorakit inspect runs/r
    lorakit targets --targets all-linear
    lorakit tasks list | lorakit tasks export NAME --split test --n 100
    lorakit compare | dylora | continual           training methods (see lorakit.cli.method_commands)
    lorakit combine --adapter a=0.7 --adapter b=-0.3 --mode cat --out c/   exact adapter combinations
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lorakit.cli.args import (TASK_EVAL_N, add_init_argument, add_lora_arguments, add_train_arguments,
                              example_count, lora_config, train_config)
from lorakit.cli.combine_commands import add_combine_command
from lorakit.cli.analyze_commands import add_analyze_command
from lorakit.cli.meteora_commands import add_meteora_commands
from lorakit.cli.method_commands import add_method_commands
from lorakit.cli.xlora_commands import add_xlora_commands
from lorakit.errors import LorakitError
from lorakit.models import DEFAULT_MODEL


def _cmd_train(args: argparse.Namespace) -> None:
    from lorakit.jobs.finetune import finetune, finetune_adapters, resume_finetune
    if args.resume:
        result = resume_finetune(args.resume, progress=not args.quiet)
    elif not args.data or not args.out:
        raise LorakitError("lorakit train needs --data and --out (or --resume DIR)")
    elif len(args.data) > 1 or "=" in args.data[0]:
        if args.init != "kaiming" or args.eval_data:
            raise LorakitError("several adapters in one batch train from the default init, without --eval-data")
        result = finetune_adapters(_named_datasets(args.data), args.out, base=args.base, lora=lora_config(args),
                                   config=train_config(args), n=args.n, overwrite=args.overwrite,
                                   progress=not args.quiet)
    else:
        result = finetune(args.data[0], args.out, base=args.base, lora=lora_config(args), config=train_config(args),
                          n=args.n, eval_data=args.eval_data, init=args.init, overwrite=args.overwrite,
                          progress=not args.quiet)
    print(json.dumps(result.summary()))


def _named_datasets(values: list[str]) -> dict[str, str]:
    """``NAME=DATA`` pairs (several adapters trained in one batch) as a dict; each name once."""
    pairs = [value.partition("=") for value in values]
    if any(not name or not sep or not data for name, sep, data in pairs):
        raise LorakitError("to train several adapters give every --data as NAME=FILE (or NAME=task:TASK)")
    names = [name for name, _, _ in pairs]
    if len(set(names)) != len(names):
        raise LorakitError(f"adapter names repeat in --data: {names}")
    return {name: data for name, _, data in pairs}


def _cmd_eval(args: argparse.Namespace) -> None:
    from lorakit.jobs.evaluate import evaluate_adapter
    result = evaluate_adapter(args.data, base=args.base, adapter=args.adapter, split=args.split,
                              n=example_count(args.data, args.n, TASK_EVAL_N),
                              batch_size=args.batch_size, progress=not args.json)
    if not args.json:
        for prediction in result.predictions[: args.show]:
            print(f"  {prediction!r}")
    print(json.dumps(result.metrics()) if args.json else
          f"exact match {result.exact_match:.1%} on {result.n} examples; loss {result.loss:.4f}, "
          f"perplexity {result.perplexity:.2f}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from lorakit.jobs.generate import complete
    outputs = complete(args.prompt, base=args.base, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                       do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for output in outputs:
        print(output)


def _cmd_merge(args: argparse.Namespace) -> None:
    from lorakit.jobs.merge import merge_into_model
    print(merge_into_model(args.adapter, args.out, base=args.base))


def _cmd_inspect(args: argparse.Namespace) -> None:
    from lorakit.jobs.inspect import inspect_adapter
    print(json.dumps(inspect_adapter(args.adapter), indent=2))


def _cmd_targets(args: argparse.Namespace) -> None:
    from lorakit.jobs.inspect import list_targets
    plans = list_targets(lora_config(args), base=args.base)
    for p in plans:
        print(f"{p.name}\t{p.layer_type}{list(p.weight_shape)}\trank={p.rank}\talpha={p.alpha:g}\tscale={p.scale:g}")
    print(f"{len(plans)} modules would be wrapped", file=sys.stderr)


def _cmd_tasks(args: argparse.Namespace) -> None:
    from lorakit.data.tasks import get_task, task_names
    if args.action == "list":
        for name in task_names():
            print(f"{name}\t{get_task(name).description}")
        return
    if not args.name:
        raise LorakitError("lorakit tasks export needs a task NAME; see lorakit tasks list")
    from lorakit.data.jsonl import example_to_json
    for example in get_task(args.name).examples(args.split, args.n):
        print(json.dumps(example_to_json(example)))


def _cmd_demo(args: argparse.Namespace) -> None:
    if args.which == "xlora":
        from lorakit.demos.xlora_demo import run_xlora_demo
        run_xlora_demo(args.out or "runs/xlora-demo", test_n=args.test_n or 50)
        return
    if args.which == "intruders":
        from lorakit.jobs.intruder_study import IntruderStudy, run_intruder_study
        run_intruder_study(args.out or "runs/intruders", study=IntruderStudy(test_n=args.test_n or 50))
        return
    if args.which == "mixtures":
        from lorakit.jobs.mixture_study import MixtureBudget, run_mixtures_comparison
        run_mixtures_comparison(args.out or "runs/mixtures", budget=MixtureBudget(test_n=args.test_n or 50))
        return
    from lorakit.demos.default_demo import run_demo
    run_demo(task=args.task, steps=args.steps, out=args.out, test_n=args.test_n)


def _command(commands, name: str, handler, help_text: str, base: bool = True) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    if base:
        sub.add_argument("--base", default=DEFAULT_MODEL,
                         help=f"base model: {DEFAULT_MODEL!r}, a local directory or a hub id (default: %(default)s)")
    return sub


def _add_train(commands) -> None:
    train = _command(commands, "train", _cmd_train, "Fine-tune a LoRA adapter (or, with --full, every weight).")
    train.add_argument("--data", action="append", help="training data: a JSONL file or task:NAME; repeat as "
                                                        "NAME=DATA to train one adapter per NAME in shared batches")
    train.add_argument("--out", help="run directory: the adapter (or one directory per NAME), metrics.jsonl, "
                                     "checkpoints/")
    train.add_argument("--n", type=int, default=None, help="examples to use (task:NAME default: 1000)")
    train.add_argument("--eval-data", default=None, help="evaluation data for the periodic and final loss")
    train.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its newest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="allow --out to hold an earlier run")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_lora_arguments(train)
    add_init_argument(train)
    add_train_arguments(train)


def _add_eval(commands) -> None:
    evaluate = _command(commands, "eval", _cmd_eval,
                        "Exact match, loss and perplexity of a model (with an optional adapter).")
    evaluate.add_argument("--data", required=True, help="a JSONL file or task:NAME")
    evaluate.add_argument("--adapter", default=None, help="adapter directory (PEFT format)")
    evaluate.add_argument("--split", default="test", choices=["train", "test"], help="task split (default: test)")
    evaluate.add_argument("--n", type=int, default=None, help=f"examples (default: all; task:NAME {TASK_EVAL_N})")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--show", type=int, default=5, help="predictions to print (without --json)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object with the metrics, last")


def _add_generate(commands) -> None:
    gen = _command(commands, "generate", _cmd_generate,
                   "Generate completions (chat template applied when the model has one).")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--adapter", default=None)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)


def _add_small_commands(commands) -> None:
    merge = _command(commands, "merge", _cmd_merge, "Write the base model with an adapter merged into its weights.")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--out", required=True)
    inspect = _command(commands, "inspect", _cmd_inspect, "Show what an adapter directory holds.", base=False)
    inspect.add_argument("adapter", help="adapter directory")
    targets = _command(commands, "targets", _cmd_targets, "Dry run: list the modules a LoRA config would wrap.")
    add_lora_arguments(targets)
    tasks = _command(commands, "tasks", _cmd_tasks, "List the built-in tasks, or export one as JSONL.", base=False)
    tasks.add_argument("action", choices=["list", "export"])
    tasks.add_argument("name", nargs="?", help="task name (for export)")
    tasks.add_argument("--split", default="train", choices=["train", "test"])
    tasks.add_argument("--n", type=int, default=100)
    demo = _command(commands, "demo", _cmd_demo,
                    "Train an adapter on a built-in task and compare it with the base model.", base=False)
    demo.add_argument("which", nargs="?", default="lora", choices=["lora", "xlora", "mixtures", "intruders"],
                      help="lora: one adapter vs the base model (default); xlora: experts and X-LoRA (~20 min); "
                           "mixtures: one LoRA on all tasks vs MixLoRA vs MeteoRA vs X-LoRA, one budget (~1 h; "
                           "resumes finished stages); intruders: the intruder-dimension study (~45 min, resumes)")
    demo.add_argument("--task", default=None, help="built-in task (default: date)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 60)")
    demo.add_argument("--test-n", type=int, default=None, help="held-out examples to score (default: 100)")
    demo.add_argument("--out", default=None, help="where to keep the results (lora default: a temporary "
                                                  "directory; xlora: runs/xlora-demo; mixtures: runs/mixtures; "
                                                  "intruders: runs/intruders)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA adapters: train, evaluate, generate, merge.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_generate, _add_small_commands, add_xlora_commands):
        add(commands)
    add_method_commands(commands, _command)
    add_meteora_commands(commands, _command)
    add_combine_command(commands, _command)
    add_analyze_command(commands, _command)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    action = getattr(args, "action", None)
    return f"{args.command} {action}" if args.command in ("xlora", "dylora", "meteora") else args.command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except LorakitError as err:
        print(f"lorakit {_command_name(args)}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {_command_name(args)}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
