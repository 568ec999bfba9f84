"""The quantization study, part 2: every system trained with the same budget, then scored by exact match.

Default model (SmolLM2-135M-Instruct, fp32, CPU). For each of two built-in tasks, ``lorakit compare`` trains every
system in its own ``lorakit train`` process with the same data order, steps, batch, learning rate, rank and seed
(only the system's own flags differ; ``lorakit.jobs.method_runs.PRESETS``), measuring each process's peak memory and
the training loop's seconds per step, and scores it on the same held-out examples:

* ``lora`` (fp32 base), ``qlora-nf4``, ``loftq``, ``lq-lora-4 / 3 / 2.75 / 2.5`` (10 alternations, small grid; the
  cost sweep is remembered, so the four budgets share one), ``l4q-4 / 3`` (one quantized model each).

Then the post-training-quantization baselines that L4Q's claim is about, each scored the same way:

* ``lora + rtn-<b>``: the fp32 LoRA merged into its base, then every decoder linear rounded to the nearest of
  ``b``-bit uniform levels in groups of 128 with min-max steps (L4Q's format, without its training);
* ``qlora-nf4 + requantized``: the QLoRA adapter merged into its NF4 base and requantized (``lorakit merge --into
  requantized``).

Results go to ``docs/results/quantization_training.json``; the run directories to ``--runs``.

    .venv/bin/python benchmarks/quantization_training.py [--steps 20] [--tasks date,units] [--eval-n 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import lorakit
from common import emit
from lorakit.core.merge import merge_and_unload
from lorakit.jobs.compare import compare_methods
from lorakit.jobs.evaluate import evaluate_adapter, evaluate_on
from lorakit.quant.l4q import attach_l4q, finalize_l4q

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "quantization_training.json"
RUNS = ROOT / "runs" / "quantization-study"
SYSTEMS = ("lora", "qlora-nf4", "loftq", "lq-lora-4", "lq-lora-3", "lq-lora-2.75", "lq-lora-2.5", "l4q-4", "l4q-3")
RTN_BITS = (4, 3)
L4Q_GROUP = 128


def train_flags(steps: int) -> list[str]:
    """The budget every system shares (the demo's recipe at fewer steps)."""
    return ["--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--rank", "16", "--alpha", "32",
            "--targets", "all-linear", "--seed", "0"]


@torch.no_grad()
def lora_then_rtn(adapter: Path, data: str, bits: int, eval_n: int) -> float:
    """Exact match of the fp32 LoRA at ``adapter`` merged into its base, then rounded to ``bits``-bit uniform levels
    in groups of 128 (a fresh L4Q layer with B = 0 rounds ``W0`` exactly so, and finalizing keeps the codes)."""
    model, tokenizer = lorakit.load_model()
    lorakit.load_adapter(model, adapter)
    merged = merge_and_unload(model)
    lorakit.attach(merged, lorakit.LoraConfig(rank=1, alpha=1, targets="all-linear"))  # B = 0: adds nothing
    attach_l4q(merged, bits=bits, group_size=L4Q_GROUP)
    finalize_l4q(merged)
    return evaluate_on(merged.eval(), tokenizer, data, n=eval_n).exact_match


def qlora_then_requantized(adapter: Path, data: str, out: Path, eval_n: int) -> float:
    """Exact match of the QLoRA adapter at ``adapter`` merged into its NF4 base and requantized."""
    if not (out / "merge_report.json").is_file():
        subprocess.run([sys.executable, "-m", "lorakit", "merge", "--adapter", str(adapter), "--out", str(out),
                        "--into", "requantized"], check=True, capture_output=True)
    return evaluate_adapter(data, adapter=out, n=eval_n).exact_match


def table(results: dict) -> str:
    """The results as Markdown: a row per system, for each task its exact match, then the measurements."""
    tasks = list(results["tasks"])
    first = results["tasks"][tasks[0]]["systems"]
    lines = [f"| system | {' | '.join(f'{t} exact match' for t in tasks)} | {tasks[0]} final loss "
             "| s / step | peak memory (MiB) |", "|---|" + "---:|" * (len(tasks) + 3)]
    for name, record in first.items():
        matches = " | ".join(f"{results['tasks'][t]['systems'][name]['exact_match']:.0%}" for t in tasks)
        lines.append(f"| {name} | {matches} | {record['final_loss']:.3f} | {record['seconds_per_step']:.2f} "
                     f"| {record['peak_memory_mb']:,.0f} |")
    for name in results["tasks"][tasks[0]]["post_training_quantization"]:
        matches = " | ".join(f"{results['tasks'][t]['post_training_quantization'][name]:.0%}" for t in tasks)
        lines.append(f"| {name} | {matches} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="date,units")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-n", type=int, default=50)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    systems = args.systems.split(",")
    results = {"benchmark": "benchmarks/quantization_training.py", "part": "exact match after the same budget",
               "model": "smollm2-135m", "dtype": "float32", "device": "cpu", "torch": torch.__version__,
               "python": platform.python_version(), "train_flags": train_flags(args.steps), "eval_n": args.eval_n,
               "tasks": {}}
    for task in args.tasks.split(","):
        data, runs = f"task:{task}", args.runs / task
        trained = compare_methods(data, runs, methods=systems, train_flags=train_flags(args.steps),
                                  eval_n=args.eval_n, target_loss=0.1)
        record = {result.method: asdict(result) for result in trained}
        for result in trained:
            emit({"task": task, "system": result.method, "exact_match": result.exact_match,
                  "final_loss": result.final_loss, "seconds_per_step": result.seconds_per_step,
                  "peak_memory_mb": result.peak_memory_mb})
        baselines = {}
        if "lora" in systems:
            for bits in RTN_BITS:
                baselines[f"lora + rtn-{bits}"] = lora_then_rtn(runs / "lora", data, bits, args.eval_n)
        if "qlora-nf4" in systems:
            baselines["qlora-nf4 + requantized"] = qlora_then_requantized(runs / "qlora-nf4", data,
                                                                          runs / "qlora-nf4-requantized", args.eval_n)
        for name, exact_match in baselines.items():
            emit({"task": task, "system": name, "exact_match": exact_match})
        results["tasks"][task] = {"systems": record, "post_training_quantization": baselines}
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each task: a partial run keeps its part
    print(table(results))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
