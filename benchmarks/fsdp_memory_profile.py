"""Where a ``--fsdp`` rank's memory goes during training: rank 0's resident memory through the steps, by moment.

The random ~1.1B-parameter Llama of ``memory_scaling.py`` (under ``--workdir``, built once), LoRA r = 16 on every
decoder linear, 2 ranks x 1 thread on gloo, micro-batches of one ``task:date`` example, as the FSDP row of
``distributed.py``. Each rank runs ``lorakit train --fsdp`` with a thread sampling its ``VmRSS`` every 10 ms; the
samples are labelled by what the rank is doing (loading, the forward of the embedding, of each block and of the
head, the backward, the optimizer step: global forward pre-hooks, ``torch.autograd.backward`` and the optimizer's
step hooks), and rank 0 prints the highest sample of each moment. Results go to
``docs/results/fsdp_memory_profile.json``.

    .venv/bin/python benchmarks/fsdp_memory_profile.py [--steps 2] [--workdir /tmp/lorakit-1b] [--no-keep-freed-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "fsdp_memory_profile.json"
SAMPLE_S = 0.01


class MemoryProfile:
    """The highest ``VmRSS`` sampled during each labelled moment, in the order the moments began."""

    def __init__(self) -> None:
        self.moment, self.step = "start", 0
        self.peaks: dict[str, float] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def enter(self, what: str) -> None:
        self.moment = f"step {self.step}: {what}" if what != "loading" else what

    def _sample(self) -> None:
        while True:
            resident = _resident_mib()
            self.peaks[self.moment] = max(self.peaks.get(self.moment, 0.0), resident)
            time.sleep(SAMPLE_S)


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("this profile reads /proc/self/status (Linux)")


def profiled_training(argv: list[str]) -> None:
    """One rank: ``lorakit train argv`` with the moments labelled; rank 0 prints the profile as JSON."""
    import torch
    import torch.optim.optimizer as optimizer_hooks
    from torch import nn

    import lorakit.jobs.finetune as finetune
    from lorakit.cli.main import main

    profile = MemoryProfile()

    def on_forward(module: nn.Module, args: tuple) -> None:
        if isinstance(module, nn.Embedding):
            profile.enter("forward of the embedding")
        elif type(module).__name__.endswith("DecoderLayer"):
            profile.enter(f"forward of block {module.self_attn.layer_idx}")
        elif module is head:
            profile.enter("forward of the head")

    head = None
    fill = finetune.shard_and_fill

    def shard_and_fill(model, files):
        nonlocal head
        profile.enter("loading")
        fill(model, files)
        head = model.get_output_embeddings()
        profile.enter("loaded")

    def backward(*args, **kwargs):
        profile.enter("backward")
        return autograd_backward(*args, **kwargs)

    def stepped(*_) -> None:
        profile.enter("after the optimizer step")
        profile.step += 1

    autograd_backward = torch.autograd.backward
    torch.autograd.backward = backward
    finetune.shard_and_fill = shard_and_fill
    nn.modules.module.register_module_forward_pre_hook(on_forward)
    optimizer_hooks.register_optimizer_step_pre_hook(lambda *_: profile.enter("optimizer step"))
    optimizer_hooks.register_optimizer_step_post_hook(stepped)
    status = main(argv)
    time.sleep(2 * SAMPLE_S)
    if os.environ.get("RANK") == "0":
        print("PROFILE " + json.dumps({moment: round(peak) for moment, peak in profile.peaks.items()}))
    sys.exit(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-1b"))
    parser.add_argument("--no-keep-freed-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from memory_scaling import build_model
    build_model(args.workdir / "model")
    with tempfile.TemporaryDirectory(prefix="lorakit-fsdp-profile-") as scratch:
        train = ["train", "--data", "task:date", "--out", str(Path(scratch) / "run"), "--quiet", "--rank", "16",
                 "--alpha", "32", "--seed", "0", "--base", str(args.workdir / "model"), "--steps", str(args.steps),
                 "--batch-size", "1", "--lr", "1e-3", "--fsdp",
                 *(["--no-keep-freed-memory"] if args.no_keep_freed_memory else [])]
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 __file__, "--rank-of-profile", *train], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"the profiled run failed:\n{result.stderr[-3000:]}")
    profile = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("PROFILE "))[8:])
    for moment, peak in profile.items():
        print(f"{peak:7,d} MiB  {moment}")
    args.out.write_text(json.dumps({"benchmark": "benchmarks/fsdp_memory_profile.py", "steps": args.steps,
                                    "keep_freed_memory": not args.no_keep_freed_memory,
                                    "rank0_peak_resident_mib_by_moment": profile}, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-of-profile"]:
        profiled_training(sys.argv[2:])
    else:
        main()
