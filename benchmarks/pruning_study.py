"""The pruning study: LoRAM and PAT against plain LoRA on the default model, and LoRAM's bytes at ~1B parameters.

Part 1, training (default model, SmolLM2-135M-Instruct, fp32, CPU). For each of two built-in tasks, ``lorakit
compare`` trains every system in its own ``lorakit train`` process with the same data order, steps, batch, learning
rate, rank and seed (only the system's own flags differ: ``lorakit.jobs.method_runs.PRESETS``), measuring each
process's training peak memory and the loop's seconds per step, and scores the result on the same held-out
examples by exact match:

* ``lora``: plain LoRA on the full model;
* ``loram-25 / 50``: LoRAM with 25 / 50% of each pruned block's FFN channels and at most that share of its
  key/value head groups removed (gradient importance on 4 batches; blocks 2..28 of 30), scored as the recovered
  adapter on the full model; ``-aligned``: after 50 steps of alignment on the offline corpus; ``qloram-50``: the
  pruned base in NF4. A LoRAM process loads the full model to prune it; its ``peak_memory_mb`` is the training
  peak after that (the run's ``loram.json`` records the preparation peak);
* ``pat-25``: PAT keeping 75% of the hidden channels (the mask hard from 40% of the run on: a short run needs the
  time to recover from the cut), scored as the physically pruned model it writes.

Then PAT alone again on the first task with ``--pat-long-steps`` (240) steps: its cut needs more steps to recover
from than the shared budget gives.

Part 2, PAT's pruned model: its parameters and its forward time against the full model's in the same process
(a batch of ``--forward-batch`` rows of ``--forward-length`` tokens, the median of ``--repeats``).

Part 3, bytes at ~1B and 70B parameters: the memory-scaling study's randomly initialised Llama shape (22 blocks, hidden
2048, FFN 5632, 32 heads in 4 key/value groups, vocabulary 49,152; built on the meta device: no weights),
structurally pruned as LoRAM prunes (random importance: bytes do not depend on which structures go) at 50% and
at the paper's 85%, with and without NF4 on the decoder linears; bytes against the unpruned model in bf16 (the
paper's baseline) and fp32. The same arithmetic on LLaMA-3.1-70B's shape (blocks 4..77 of 80 pruned) checks the
paper's headline of 15.81x fewer bytes for QLoRAM at 85%.

Results go to ``docs/results/pruning.json``; the run directories to ``--runs``.

    .venv/bin/python benchmarks/pruning_study.py [--steps 60] [--tasks date,units] [--eval-n 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from common import emit
from lorakit.jobs.compare import compare_methods
from lorakit.jobs.evaluate import evaluate_on
from lorakit.pruning.importance import random_scores
from lorakit.pruning.structured import apply_pruning, plan_pruning, pruned_block_indices
from lorakit.quant import bits_per_parameter
from lorakit.quant.base_schemes import QLORA_NF4

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "pruning.json"
RUNS = ROOT / "runs" / "pruning-study"
SYSTEMS = ("lora", "loram-25", "loram-50", "loram-25-aligned", "loram-50-aligned", "qloram-50", "pat-25")
SHAPE_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 49152, "max_position_embeddings": 2048,
            "tie_word_embeddings": False}
SHAPE_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 2048,
             "tie_word_embeddings": False}
"""LLaMA-3.1-70B's shape, for LoRAM's headline arithmetic (blocks 4..77 pruned, as the paper's script does)."""


def train_flags(steps: int) -> list[str]:
    """The budget every system shares (the quantization study's recipe)."""
    return ["--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--rank", "16", "--alpha", "32",
            "--targets", "all-linear", "--seed", "0"]


def _run_record(run_dir: Path) -> dict:
    """What a LoRAM or PAT run recorded about its pruned model."""
    for name in ("loram.json", "pat.json"):
        if (run_dir / name).is_file():
            record = json.loads((run_dir / name).read_text())
            return {k: v for k, v in record.items() if k not in ("blocks", "kept")}
    return {}


@torch.no_grad()
def forward_seconds(model, ids: torch.Tensor, repeats: int) -> float:
    """The median wall time of one forward of ``ids`` (after one warm-up)."""
    model(input_ids=ids)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=ids)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pat_speed(pat_dir: Path, batch: int, length: int, repeats: int) -> dict:
    """Part 2: parameters and forward time of the PAT model in ``pat_dir`` against the full default model."""
    full = lorakit.load_model()[0].eval()
    pruned = lorakit.load(pat_dir).model.eval()
    ids = torch.randint(0, full.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    rounds = [(forward_seconds(full, ids, repeats), forward_seconds(pruned, ids, repeats)) for _ in range(2)]
    full_s, pruned_s = min(r[0] for r in rounds), min(r[1] for r in rounds)
    return {"full_parameters": sum(p.numel() for p in full.parameters()),
            "pruned_parameters": sum(p.numel() for p in pruned.parameters()),
            "full_hidden_size": full.config.hidden_size, "pruned_hidden_size": pruned.config.hidden_size,
            "forward_batch": batch, "forward_length": length, "repeats": repeats,
            "full_forward_s": full_s, "pruned_forward_s": pruned_s, "speedup": full_s / pruned_s}


def _linear_parameters(model) -> int:
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."))


def pruned_bytes(shape: dict, ratios=(0.5, 0.85), keep_first: int = 2, keep_last: int = 1) -> dict:
    """Part 3: parameter bytes of ``shape``, unpruned and LoRAM-pruned, in bf16 and with NF4 linears."""
    nf4_bytes = bits_per_parameter(QLORA_NF4) / 8

    def sizes(model) -> dict:
        total, linear = sum(p.numel() for p in model.parameters()), _linear_parameters(model)
        return {"parameters": total, "decoder_linear_parameters": linear, "fp32_bytes": 4 * total,
                "bf16_bytes": 2 * total, "nf4_bytes": nf4_bytes * linear + 2 * (total - linear)}

    with torch.device("meta"):
        full = LlamaForCausalLM(LlamaConfig(**shape))
    rows = {"unpruned": sizes(full)}
    for ratio in ratios:
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        blocks = pruned_block_indices(model, keep_first, keep_last)
        apply_pruning(model, plan_pruning(model, random_scores(model, blocks, seed=0), ratio))
        rows[f"loram-{ratio:g}"] = sizes(model)
    base = rows["unpruned"]["bf16_bytes"]
    for row in rows.values():
        row["bf16_reduction"] = base / row["bf16_bytes"]
        row["nf4_reduction"] = base / row["nf4_bytes"]
        row["fp32_over_nf4"] = rows["unpruned"]["fp32_bytes"] / row["nf4_bytes"]
        row["every_parameter_4_bit_reduction"] = base / (row["parameters"] / 2)  # the paper's accounting
    return {"shape": shape, "pruned_blocks": f"{keep_first}..{shape['num_hidden_layers'] - keep_last - 1}",
            "nf4_bits_per_parameter": bits_per_parameter(QLORA_NF4),
            "note": "nf4: decoder linears in NF4 (codes + double-quantized scales), the rest bf16; "
                    "every_parameter_4_bit: each parameter at exactly 4 bits (the accounting behind LoRAM's 15.81x); "
                    "reductions against the unpruned model in bf16", "rows": rows}


def table(results: dict) -> str:
    """Part 1 as Markdown: per system the exact match on each task, then the first task's measurements."""
    tasks = list(results["tasks"])
    lines = [f"| system | {' | '.join(f'{t} exact match' for t in tasks)} | training peak MiB ({tasks[0]}) | "
             f"s/step ({tasks[0]}) | parameters trained on |", "|---|" + "---|" * (len(tasks) + 3)]
    first = results["tasks"][tasks[0]]
    for name, result in first["systems"].items():
        matches = " | ".join(f"{results['tasks'][t]['systems'][name]['exact_match']:.0%}" for t in tasks)
        record = first["pruned"].get(name, {})
        trained_on = record.get("parameters_pruned") or record.get("parameters_after") or first["base_parameters"]
        lines.append(f"| {name} | {matches} | {result['peak_memory_mb']:,.0f} | {result['seconds_per_step']:.2f} | "
                     f"{trained_on / 1e6:.1f}M |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="date,units")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-n", type=int, default=50)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--pat-long-steps", type=int, default=240,
                        help="PAT again at this budget, on the first task (0: not)")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument("--forward-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    systems = args.systems.split(",")
    results = {"benchmark": "benchmarks/pruning_study.py", "model": "smollm2-135m", "dtype": "float32",
               "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
               "train_flags": train_flags(args.steps), "eval_n": args.eval_n, "tasks": {}}
    results["bytes_at_1b"] = pruned_bytes(SHAPE_1B)
    results["bytes_at_70b"] = pruned_bytes(SHAPE_70B, keep_first=4, keep_last=2)
    for size in ("1b", "70b"):
        emit({"part": f"bytes at {size}", **{k: round(v["nf4_reduction"], 2)
                                             for k, v in results[f"bytes_at_{size}"]["rows"].items()}})
    base, tokenizer = lorakit.load_model()
    base_parameters = sum(p.numel() for p in base.parameters())
    for task in args.tasks.split(","):
        data, runs = f"task:{task}", args.runs / task
        base_match = evaluate_on(base, tokenizer, data, n=args.eval_n).exact_match
        trained = compare_methods(data, runs, methods=systems, train_flags=train_flags(args.steps),
                                  eval_n=args.eval_n, target_loss=0.1)
        pruned = {result.method: _run_record(runs / result.method) for result in trained}
        for result in trained:
            emit({"task": task, "system": result.method, "exact_match": result.exact_match,
                  "final_loss": result.final_loss, "seconds_per_step": result.seconds_per_step,
                  "peak_memory_mb": result.peak_memory_mb})
        results["tasks"][task] = {"base_exact_match": base_match, "base_parameters": base_parameters,
                                  "systems": {r.method: asdict(r) for r in trained}, "pruned": pruned}
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after each task: a partial run keeps its part
    del base
    first_task = args.tasks.split(",")[0]
    if "pat-25" in systems and args.pat_long_steps:
        long_run = compare_methods(f"task:{first_task}", args.runs / first_task / f"steps-{args.pat_long_steps}",
                                   methods=["pat-25"], train_flags=train_flags(args.pat_long_steps),
                                   eval_n=args.eval_n, target_loss=0.1)[0]
        results["pat_long"] = {"task": first_task, "steps": args.pat_long_steps, **asdict(long_run)}
        emit({"part": "pat long", "steps": args.pat_long_steps, "exact_match": long_run.exact_match,
              "final_loss": long_run.final_loss})
    if "pat-25" in systems:
        results["pat_speed"] = pat_speed(args.runs / first_task / "pat-25", args.forward_batch, args.forward_length,
                                         args.repeats)
        emit({"part": "pat speed", **results["pat_speed"]})
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
