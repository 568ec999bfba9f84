"""Using what a run wrote: ``eval``, ``generate``, ``merge``, ``inspect``, and the dry run ``targets``.

    lorakit eval --data task:reverse --adapter runs/r --json
    lorakit generate --adapter runs/r --prompt "Reverse: abc"
    lorakit merge --adapter runs/r --out merged/
    lorakit inspect runs/r
    lorakit targets --targets all-linear

The jobs read the directory's kind (a plain adapter, a mixture, ...); the commands do not.
"""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.cli.common import LORA, TASK_EVAL_N, command, example_count
from lorakit.jobs.complete import complete
from lorakit.jobs.evaluate import evaluate_adapter
from lorakit.jobs.inspect import inspect_adapter, list_targets
from lorakit.jobs.merge_model import merge_into_model
from lorakit.jobs.quantized_merge import INTO

ADAPTER_HELP = "a directory lorakit wrote: an adapter (PEFT format) or a mixture; its own metadata says which"


def _eval(args: argparse.Namespace) -> None:
    result = evaluate_adapter(args.data, base=args.base, adapter=args.adapter, split=args.split,
                              n=example_count(args.data, args.n, TASK_EVAL_N),
                              batch_size=args.batch_size, progress=not args.json)
    if not args.json:
        for prediction in result.predictions[: args.show]:
            print(f"  {prediction!r}")
    print(json.dumps(result.metrics()) if args.json else
          f"exact match {result.exact_match:.1%} on {result.n} examples; loss {result.loss:.4f}, "
          f"perplexity {result.perplexity:.2f}")


def _generate(args: argparse.Namespace) -> None:
    outputs = complete(args.prompt, base=args.base, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                       do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for output in outputs:
        print(output)


def _merge(args: argparse.Namespace) -> None:
    report = merge_into_model(args.adapter, args.out, base=args.base, into=args.into)
    if report is not None:  # a quantized base: say what the merge changed (per layer: merge_report.json)
        shown = {k: ({n: v for n, v in part.items() if n != "per_layer"} if isinstance(part, dict) else part)
                 for k, part in report.items()}
        print(json.dumps(shown, indent=2), file=sys.stderr)
    print(args.out)


def _inspect(args: argparse.Namespace) -> None:
    print(json.dumps(inspect_adapter(args.adapter), indent=2))


def _targets(args: argparse.Namespace) -> None:
    plans = list_targets(LORA.build(args), base=args.base)
    for p in plans:
        print(f"{p.name}\t{p.layer_type}{list(p.weight_shape)}\trank={p.rank}\talpha={p.alpha:g}\tscale={p.scale:g}")
    print(f"{len(plans)} modules would be wrapped", file=sys.stderr)


def register(commands) -> None:
    evaluate = command(commands, "eval", _eval,
                       "Exact match, loss and perplexity of a model (with an optional adapter).", base="recorded")
    evaluate.add_argument("--data", required=True, help="a JSONL file or task:NAME")
    evaluate.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    evaluate.add_argument("--split", default="test", choices=["train", "test"], help="task split (default: test)")
    evaluate.add_argument("--n", type=int, default=None, help=f"examples (default: all; task:NAME {TASK_EVAL_N})")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--show", type=int, default=5, help="predictions to print (without --json)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object with the metrics, last")

    generate = command(commands, "generate", _generate,
                       "Generate completions (chat template applied when the model has one).", base="recorded")
    generate.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    generate.add_argument("--adapter", default=None, help=ADAPTER_HELP)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)

    merge = command(commands, "merge", _merge, "Write the base model with an adapter merged into its weights.",
                    base="recorded")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--out", required=True)
    merge.add_argument("--into", choices=INTO, default=None,
                       help="an adapter trained on a quantized base: merge into the dequantized base (default; "
                            "full precision, equal to the unmerged model), requantized (an nf-model as small as the "
                            "base; rounding changes it) or the original full-precision weights; the error against "
                            "the unmerged model is printed and written to merge_report.json")
    inspect = command(commands, "inspect", _inspect, "Show what a directory of any kind holds.", base=False)
    inspect.add_argument("adapter", help=ADAPTER_HELP)
    command(commands, "targets", _targets, "Dry run: list the modules a LoRA config would wrap.", configs=(LORA,))
