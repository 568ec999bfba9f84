"""How long a sequence LoRA trains on in little memory: whole sequences, activation checkpointing, SeCO, SpaCO.

The default model (SmolLM2-135M) with LoRA r = 8, alpha = 16 on q_proj and v_proj (SeCO's setting), one sequence
a step of ``L`` tokens of text (``task:recall`` prompts run together), every token supervised, AdamW. Each (method,
length) runs ``lorakit.train`` in its own process: ``plain`` (whole sequences), ``checkpointing``
(``gradient_checkpointing``), ``seco`` (``chunk_size``), ``spaco`` (``chunk_size`` and ``sparse_chunks = N / 4``,
the paper's estimator). Memory: the process's peak resident memory during training above what it holds once the
model is loaded (Linux's VmHWM, reset after loading through ``/proc/self/clear_refs``), fitted per token by least
squares over the lengths; from the fit, the longest sequence each method trains within an activation budget
(2 GiB). Speed: seconds per token of the run's last step (1K-4K: the second of two steps; 8K: the only one).
``--loss-steps`` steps of SeCO and of SpaCO at ``--loss-length`` tokens compare their training losses (the whole
loss, which both log). Results go to ``docs/results/long_context.json``.

    .venv/bin/python benchmarks/long_context.py [--lengths 1024 2048 4096 8192] [--chunk-size 128]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from common import emit

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "long_context.json"
METHODS = ("plain", "checkpointing", "seco", "spaco")
BUDGET_MIB = 2048
PLAIN_LIMIT_MIB = 20_000
"""Runs the fit predicts above this are not run (the machine has 24 GiB)."""
MAX_POSITIONS = 8192
"""SmolLM2's position limit."""


def _text_example(length: int):
    """One example whose completion is at least ``length`` tokens of recall prompts run together."""
    from lorakit.data.example import Example
    from lorakit.data.tasks.recall import RECALL
    generator = random.Random(0)
    prompts = [RECALL.generate(generator)[0] for _ in range(length // 1500 + 1)]
    return Example(prompt="Read:", completion="\n\n".join(prompts))


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_one(method: str, length: int, steps: int, chunk_size: int) -> dict:
    """One method at one length in this process (see the module docstring)."""
    import torch

    import lorakit
    from lorakit.train import train
    torch.manual_seed(0)
    model, tokenizer = lorakit.load_model()
    lorakit.attach(model, lorakit.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")))
    chunks = -(-length // chunk_size)
    config = lorakit.TrainConfig(
        steps=steps, batch_size=1, max_length=length, lr=1e-4, chat=False, log_every=1, warmup_steps=0,
        gradient_checkpointing=method == "checkpointing",
        chunk_size=chunk_size if method in ("seco", "spaco") else None,
        sparse_chunks=max(1, chunks // 4) if method == "spaco" else None)
    example = _text_example(length)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the loaded model
    loaded = _status("VmRSS")
    started = time.perf_counter()
    result = train(model, tokenizer, [example], config, progress=False)
    elapsed = time.perf_counter() - started
    times = [row["elapsed_s"] for row in result.metrics if "elapsed_s" in row]
    last = times[-1] - (times[-2] if len(times) > 1 else 0.0)
    return {"method": method, "length": length, "steps": steps, "chunk_size": chunk_size if config.chunk_size else None,
            "sparse_chunks": config.sparse_chunks, "loaded_mib": loaded,
            "activation_peak_mib": _status("VmHWM") - loaded, "seconds_last_step": last,
            "seconds_per_token": last / length, "losses": [row["loss"] for row in result.metrics if "loss" in row],
            "wall_s": elapsed}


def _child(method: str, length: int, steps: int, chunk_size: int) -> dict:
    command = [sys.executable, __file__, "--one", method, str(length), "--steps", str(steps),
               "--chunk-size", str(chunk_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:  # e.g. killed for memory: recorded, the others still run
        return {"method": method, "length": length, "failed": done.returncode, "stderr": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``peak = a + b * length``; returns (a, b)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def _points(runs: list[dict], method: str) -> list[tuple[int, float]]:
    """(length, activation peak) of ``method``'s runs that finished."""
    return [(r["length"], r["activation_peak_mib"]) for r in runs if r["method"] == method and "failed" not in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 2, 1 at 8K and beyond)")
    parser.add_argument("--loss-length", type=int, default=4096)
    parser.add_argument("--loss-steps", type=int, default=6)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        emit(run_one(args.one[0], int(args.one[1]), args.steps or 1, args.chunk_size))
        return
    runs = []
    for method in args.methods:
        for length in sorted(args.lengths):
            done = _points(runs, method)
            if len(done) >= 2:
                a, b = fit(done)
                if a + b * length > PLAIN_LIMIT_MIB:
                    emit({"method": method, "length": length, "skipped": f"predicted {a + b * length:.0f} MiB"})
                    continue
            steps = args.steps or (1 if length >= 8192 else 2)
            runs.append(_child(method, length, steps, args.chunk_size))
            emit(runs[-1])
    fits = {}
    for method in args.methods:
        points = _points(runs, method)
        if len(points) >= 2:
            a, b = fit(points)
            fits[method] = {"fixed_mib": a, "mib_per_token": b, "longest_in_budget": int((BUDGET_MIB - a) / b)}
    if "plain" in fits and "seco" in fits:
        fits["seco"]["length_vs_plain"] = fits["seco"]["longest_in_budget"] / fits["plain"]["longest_in_budget"]
    if "seco" in fits and fits["seco"]["longest_in_budget"] <= MAX_POSITIONS:  # the prediction, run once
        fits["seco"]["run_at_longest"] = _child("seco", fits["seco"]["longest_in_budget"], 1, args.chunk_size)
    losses = {method: _child(method, args.loss_length, args.loss_steps, args.chunk_size)
              for method in ("seco", "spaco")} if args.loss_steps else {}
    summary = {"fits": fits, "budget_mib": BUDGET_MIB, "losses": losses}
    emit(summary)
    RESULTS.write_text(json.dumps({"runs": runs, **summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
