"""Data-parallel training on this machine: 2 ranks x 1 thread against 1 process x 2 threads, same global batch.

Default model (SmolLM2-135M-Instruct, fp32, CPU), ``task:date``, LoRA r = 16 on every linear, micro-batches of
``--batch``. Each configuration is one ``lorakit train`` command (under ``torchrun`` for the ranks) in a process of
its own; reported: the training loop's tokens per second over all ranks (``metrics.jsonl``), the peak resident
memory of the largest process (``RUSAGE_CHILDREN`` of a wrapper that waits for torchrun, which waits for its ranks),
and the gradient bytes each rank all-reduces per step, for LoRA and for full fine-tuning (``--full``): why LoRA
scales out cheaply. The two single-process runs use ``--grad-accum 2`` so that their global batch is the ranks'.

Then FSDP2 against data-parallel on 2 ranks, on the random ~1.1B-parameter Llama of ``memory_scaling.py`` (written
to ``--workdir`` once, 4.7 GB): the parameter bytes each rank holds while training (``parameter_bytes_per_rank``
in ``metrics.jsonl``) and the peak memory of the largest rank, which includes loading the whole model before it
is sharded.

    .venv/bin/python benchmarks/distributed.py [--steps 8] [--batch 4] [--workdir /tmp/lorakit-1b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import emit
from memory_scaling import build_model

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "distributed.json"
PEAK = "import resource, subprocess, sys; status = subprocess.call(sys.argv[1:]); " \
       "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(status)"


def measure(name: str, launch: list[str], flags: list[str], threads: int, out: Path) -> dict:
    """One configuration in a wrapper process of its own: its metrics and the peak RSS of its largest process."""
    run_dir = out / name
    command = [sys.executable, "-c", PEAK, *launch, "train", "--data", "task:date", "--out", str(run_dir), "--quiet",
               "--log-every", "1", "--rank", "16", "--alpha", "32", "--seed", "0", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "loss" in m]
    first, last = steps[0], steps[-1]  # from the end of the first step: it pays for warm-up
    seconds = last["elapsed_s"] - first["elapsed_s"]
    tokens = last["tokens_per_s"] * last["elapsed_s"] - first["tokens_per_s"] * first["elapsed_s"]
    record = {"configuration": name, "threads_per_process": threads, "steps": len(steps),
              "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / (len(steps) - 1),
              "final_loss": last["loss"], "peak_rss_mib_largest_process": int(result.stdout.split()[-1]) / 1024,
              "allreduced_bytes_per_step": last.get("allreduced_bytes", 0),
              "parameter_bytes_per_rank": next((m["parameter_bytes_per_rank"] for m in rows
                                                if "parameter_bytes_per_rank" in m), None)}
    emit(record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="LoRA steps (at least 2)")
    parser.add_argument("--full-steps", type=int, default=3, help="full fine-tuning steps (at least 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-1b"))
    parser.add_argument("--large-steps", type=int, default=3, help="steps on the ~1.1B model (at least 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit"]
    alone = [sys.executable, "-m", "lorakit"]
    lora = ["--steps", str(args.steps), "--batch-size", str(args.batch), "--lr", "1e-3"]
    full = ["--steps", str(args.full_steps), "--batch-size", str(args.batch), "--full", "--lr", "1e-5"]
    with tempfile.TemporaryDirectory(prefix="lorakit-distributed-") as scratch:
        out = Path(scratch)
        runs = [measure("lora: 1 process x 2 threads", alone, [*lora, "--grad-accum", "2"], 2, out),
                measure("lora: 2 ranks x 1 thread", torchrun, lora, 1, out),
                measure("full: 1 process x 2 threads", alone, [*full, "--grad-accum", "2"], 2, out),
                measure("full: 2 ranks x 1 thread", torchrun, full, 1, out)]
        parameters = build_model(args.workdir / "model")
        large = ["--base", str(args.workdir / "model"), "--steps", str(args.large_steps), "--batch-size", "1",
                 "--lr", "1e-3"]
        sharded = [measure("1.1B lora: 2 ranks, data-parallel", torchrun, large, 1, out),
                   measure("1.1B lora: 2 ranks, --fsdp", torchrun, [*large, "--fsdp"], 1, out)]
    results = {"benchmark": "benchmarks/distributed.py", "model": "smollm2-135m", "dtype": "float32", "device": "cpu",
               "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "backend": "gloo", "micro_batch": args.batch, "global_batch": 2 * args.batch, "runs": runs,
               "large_model_parameters": parameters, "large_model": sharded,
               "fsdp_parameter_bytes_vs_ddp": sharded[1]["parameter_bytes_per_rank"]
               / sharded[0]["parameter_bytes_per_rank"]}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
