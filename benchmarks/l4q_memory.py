"""L4Q training (quantization-aware LoRA, ``lorakit.quant.l4q``) against plain fp32 LoRA: memory and speed.

Default model (SmolLM2-135M-Instruct, fp32, CPU), LoRA r = 16, alpha = 32 on every linear of the decoder blocks,
AdamW, batches of ``--batch`` x ``--tokens`` random tokens; ``l4q`` also turns every adapted linear into an
``L4QLinear`` (4 bits, groups of 128 input columns, ``W_q = Delta (clamp(round((W0 + s B A) / Delta - z)) + z)``).
Each system runs in its own subprocess and reports:

* ``saved_for_backward_bytes``: what autograd keeps for the backward during one training forward, beyond the
  model's own parameters and buffers (``torch.autograd.graph.saved_tensors_hooks``; exact and repeatable);
* ``peak_rss_mib`` (the process's high-water mark) and ``rss_before_training_mib`` (after loading and attaching),
  and their difference ``training_rss_mib``;
* ``seconds_per_step``: the median of ``--steps`` optimizer steps after one warm-up step, in that subprocess;
* ``interleaved``: one more subprocess holds both models and alternates their steps (``--steps`` rounds after a
  warm-up round), so that a machine shared with other work slows both alike; its median per-round ratio is
  the speed figure the summary compares with the target.

The targets: L4Q's peak training memory at most 1.15x LoRA's, seconds per step at most 1.5x. Results go to
``docs/results/l4q.json``.

    .venv/bin/python benchmarks/l4q_memory.py [--steps 5] [--batch 4] [--tokens 128]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lorakit
from common import emit, lm_training_step, saved_for_backward_bytes
from lorakit.train.peak_memory import peak_resident_mib

SYSTEMS = ("lora", "l4q")
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "l4q.json"
TARGETS = {"peak_rss_mib": 1.15, "saved_for_backward_bytes": 1.15, "seconds_per_step": 1.5}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _trainer(system: str, batch: int, tokens: int):
    """The model of ``system`` (LoRA, or LoRA turned L4Q) and a function taking one optimizer step on it."""
    from lorakit.quant.l4q import attach_l4q
    torch.manual_seed(0)
    model, _ = lorakit.load_model()
    lorakit.attach(model, lorakit.LoraConfig(rank=16, alpha=32, targets="all-linear"))
    if system == "l4q":
        attach_l4q(model, bits=4, group_size=128)
    model.train()
    parameters = list(lorakit.trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    ids = torch.randint(100, 20000, (batch, tokens), generator=torch.Generator().manual_seed(1))

    return model, parameters, optimizer, ids, lm_training_step(model, optimizer, ids)


def interleaved(steps: int, batch: int, tokens: int) -> dict:
    """Both systems in one process, their steps alternated: seconds per step of each, and per-round ratios."""
    trainers = {system: _trainer(system, batch, tokens)[-1] for system in SYSTEMS}
    seconds: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    for round_ in range(steps + 1):
        for system, step in trainers.items():
            started = time.perf_counter()
            step()
            if round_:  # the first round warms up
                seconds[system].append(time.perf_counter() - started)
    ratios = [b / a for a, b in zip(seconds["lora"], seconds["l4q"], strict=True)]
    return {"seconds_per_step": {s: statistics.median(v) for s, v in seconds.items()}, "all_seconds": seconds,
            "l4q_vs_lora_ratio_per_round": ratios, "l4q_vs_lora_median_ratio": statistics.median(ratios)}


def measure(system: str, steps: int, batch: int, tokens: int) -> dict:
    """One system's saved-for-backward bytes, memory and seconds per step."""
    model, parameters, optimizer, ids, step = _trainer(system, batch, tokens)

    rss_before = _rss_mib()
    saved = saved_for_backward_bytes(model, ids)
    optimizer.zero_grad()
    step()  # warm-up
    seconds, losses = [], []
    for _ in range(steps):
        started = time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - started)
    peak = peak_resident_mib()
    return {"system": system, "trainable_parameters": sum(p.numel() for p in parameters),
            "saved_for_backward_bytes": saved, "rss_before_training_mib": rss_before, "peak_rss_mib": peak,
            "training_rss_mib": peak - rss_before, "seconds_per_step": statistics.median(seconds),
            "all_seconds": seconds, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--system", choices=(*SYSTEMS, "interleaved"), help=argparse.SUPPRESS)  # a subprocess
    args = parser.parse_args()
    if args.system:
        run = interleaved if args.system == "interleaved" else functools.partial(measure, args.system)
        print(json.dumps(run(args.steps, args.batch, args.tokens)))
        return
    results = {}
    for system in (*SYSTEMS, "interleaved"):
        out = subprocess.run([sys.executable, __file__, "--system", system, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--tokens", str(args.tokens)],
                             check=True, capture_output=True, text=True).stdout
        results[system] = json.loads(out.strip().splitlines()[-1])
        emit({"measurement": system, **results[system]})
    lora, l4q = results["lora"], results["l4q"]
    ratios = {f"l4q_vs_lora_{key}": l4q[key] / lora[key] for key in
              ("saved_for_backward_bytes", "peak_rss_mib", "training_rss_mib", "seconds_per_step")}
    ratios["l4q_vs_lora_seconds_per_step_interleaved"] = results["interleaved"]["l4q_vs_lora_median_ratio"]
    measured = {"peak_rss_mib": ratios["l4q_vs_lora_peak_rss_mib"],
                "saved_for_backward_bytes": ratios["l4q_vs_lora_saved_for_backward_bytes"],
                "seconds_per_step": ratios["l4q_vs_lora_seconds_per_step_interleaved"]}
    meets = {f"meets_{key}_target_{TARGETS[key]}x": value <= TARGETS[key] for key, value in measured.items()}
    summary = {"measurement": "summary", **ratios, **meets}
    emit(summary)
    record = {"benchmark": "benchmarks/l4q_memory.py", "model": "smollm2-135m", "dtype": "float32", "device": "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
              "lora": {"rank": 16, "alpha": 32, "targets": "all-linear"}, "l4q": {"bits": 4, "group_size": 128},
              "batch": args.batch, "tokens": args.tokens, "steps": args.steps, "systems": results, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
