"""LoRA training on an NF4-quantized base (``lorakit.quant``) against the fp32 base, same run.

Default model (SmolLM2-135M-Instruct, CPU), LoRA r = 16, alpha = 32 on every linear of the decoder blocks,
AdamW on the adapter, batches of ``--batch`` x ``--tokens`` random tokens. The quantized runs load the base as
``lorakit train --quantize`` does (quantized as it loads, never holding the fp32 model): ``nf4`` turns every
decoder linear into an ``NFLinear`` (NF4, block 64, scales double-quantized to 8 bits in blocks of 256, read from
the cache), ``int8`` into bitsandbytes' ``Linear8bitLt``; ``nf4-adamw8bit`` also trains with bitsandbytes' 8-bit
AdamW. Each system runs in its own subprocess and reports:

* ``linear_weight_bytes``: what the decoder blocks' linear weights occupy (fp32 parameters, or the codes
  and scales a quantized layer stores);
* ``saved_for_backward_bytes``: the bytes autograd keeps for the backward during one training forward,
  beyond the model's own parameters and buffers (counted by ``torch.autograd.graph.saved_tensors_hooks``;
  exact and repeatable, unlike process memory): a dequantized weight kept for the backward would show here;
* ``optimizer_state_bytes``: the optimizer's per-parameter state (AdamW: two fp32 moments; 8-bit AdamW: codes,
  scales and maps);
* ``seconds_per_step`` (median of ``--steps`` after 2 warm-up steps) and ``peak_rss_mib`` (the process's
  high-water mark, loading included).

    .venv/bin/python benchmarks/quantized_training.py [--steps 5] [--batch 8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import lorakit
from common import emit, lm_training_step, saved_for_backward_bytes

SYSTEMS = ("fp32", "nf4", "nf4-adamw8bit", "int8")


def model_bytes(model: torch.nn.Module) -> int:
    """What the whole model's parameters and buffers occupy, each storage once (tied weights once)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def measure(system: str, steps: int, batch: int, tokens: int, base: str = "smollm2-135m") -> dict:
    """One system's weight bytes, saved-for-backward bytes, seconds per step and peak RSS."""
    from lorakit.optim.adamw_8bit import adamw_8bit, optimizer_state_bytes
    from lorakit.quant.quantized_loading import load_base
    torch.manual_seed(0)
    model, _ = load_base(base, None if system == "fp32" else system.split("-")[0])
    blocks = [m for name, m in model.named_modules() if ".layers." in name and not list(m.children())
              and ("Linear" in type(m).__name__)]
    weight_bytes = sum(t.numel() * t.element_size() for m in blocks for name, t in
                       [*m.named_parameters(), *m.named_buffers()] if name != "bias")
    whole_bytes = model_bytes(model)
    lorakit.attach(model, lorakit.LoraConfig(rank=16, alpha=32, targets="all-linear"))
    model.train()
    parameters = list(lorakit.trainable_parameters(model).values())
    optimizer = (adamw_8bit(parameters, lr=1e-4, weight_decay=0.0) if system.endswith("adamw8bit")
                 else torch.optim.AdamW(parameters, lr=1e-4))
    ids = torch.randint(100, 20000, (batch, tokens), generator=torch.Generator().manual_seed(1))
    step = lm_training_step(model, optimizer, ids)
    saved = saved_for_backward_bytes(model, ids)
    optimizer.zero_grad()
    for _ in range(2):
        step()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return {"system": system, "linear_weight_bytes": weight_bytes, "model_bytes": whole_bytes,
            "saved_for_backward_bytes": saved,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "seconds_per_step": statistics.median(seconds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--base", default="smollm2-135m", help=argparse.SUPPRESS)  # memory_scaling.py's model
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # one subprocess's run
    args = parser.parse_args()
    if args.system:
        print(json.dumps(measure(args.system, args.steps, args.batch, args.tokens, args.base)))
        return
    from lorakit.quant.quantized_loading import load_base
    load_base("smollm2-135m", "nf4")  # the cached NF4 base, so that no measured run pays for quantizing
    results = {}
    for system in SYSTEMS:
        out = subprocess.run([sys.executable, __file__, "--system", system, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--tokens", str(args.tokens)],
                             check=True, capture_output=True, text=True).stdout
        results[system] = json.loads(out.strip().splitlines()[-1])
        emit({"measurement": "training", **results[system]})
    fp32 = results["fp32"]
    emit({"measurement": "summary", "batch": args.batch, "tokens": args.tokens, "steps": args.steps,
          **{f"{system}_vs_fp32_{key}": results[system][key] / fp32[key] for system in SYSTEMS[1:] for key in
             ("linear_weight_bytes", "saved_for_backward_bytes", "optimizer_state_bytes", "seconds_per_step",
              "peak_rss_mib")}})


if __name__ == "__main__":
    main()
