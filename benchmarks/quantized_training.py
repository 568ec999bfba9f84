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
import collections
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lorakit
from common import emit, lm_training_step, saved_for_backward_bytes
from lorakit.train.peak_memory import peak_resident_mib

SYSTEMS = ("fp32", "nf4", "nf4-adamw8bit", "int8")
LQ_LORA_SYSTEMS = ("lq-lora-2.75-init", "lq-lora-2.75")
"""Run by ``memory_scaling.py`` only, each with ``--adapter-dir``. ``lq-lora-2.75-init`` reads the fp32 base whole,
attaches, runs LQ-LoRA's init at 2.75 bits per parameter (small grid, one alternation per decomposition), saves the
adapter with its quantized bases there and trains in the same process, as ``lorakit train --init lq-lora`` does;
``lq-lora-2.75`` loads that directory (``lorakit.load``: the base built with its quantized linears in place, never
the fp32 model) and trains: the memory of training on LQ-LoRA's bases once they exist."""
LQ_LORA_BUDGET = 2.75


def model_bytes(model: torch.nn.Module) -> int:
    """What the whole model's parameters and buffers occupy, each storage once (tied weights once)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def base_weight_bytes(model: torch.nn.Module) -> int:
    """What the decoder blocks' base linear weights occupy (fp32 parameters, or a quantized layer's codes and
    scales; biases left out)."""
    blocks = [m for name, m in model.named_modules() if ".layers." in name and not list(m.children())
              and "Linear" in type(m).__name__]
    return sum(t.numel() * t.element_size() for m in blocks for name, t in [*m.named_parameters(), *m.named_buffers()]
               if name != "bias")


def adapter_bytes(model: torch.nn.Module) -> int:
    """What the adapter factors occupy."""
    return sum(t.numel() * t.element_size() for t in lorakit.trainable_parameters(model).values())


def lq_lora_model(system: str, base: str, config: lorakit.LoraConfig, adapter_dir: Path) -> tuple[torch.nn.Module,
                                                                                                   dict]:
    """The model an LQ-LoRA system trains (see :data:`LQ_LORA_SYSTEMS`) and what its set-up reports."""
    if system == "lq-lora-2.75":  # what lorakit.load does, with the adapter trainable
        from lorakit.quant.quantized_adapter import QUANTIZED_BASES_FILE
        from lorakit.quant.quantized_files import load_quantized
        from lorakit.quant.quantized_loading import load_with_quantized_linears
        model, _ = load_with_quantized_linears(base, load_quantized(adapter_dir / QUANTIZED_BASES_FILE))
        lorakit.load_adapter(model, adapter_dir, trainable=True)
        return model, {}
    from lorakit.init.lq_lora.lq_lora_init import init_lq_lora
    from lorakit.quant.nf_config import bits_per_parameter
    from lorakit.quant.quantized_adapter import save_quantized_adapter
    model, _ = lorakit.load_model(base)
    lorakit.attach(model, config)
    started = time.perf_counter()
    decompositions = init_lq_lora(model, budget=LQ_LORA_BUDGET, max_iterations=1)
    seconds = time.perf_counter() - started
    save_quantized_adapter(model, adapter_dir, {name: d.quantized for name, d in decompositions.items()})
    chosen = [d.quantized for d in decompositions.values()]
    bits = sum(bits_per_parameter(q.config) * math.prod(q.shape) for q in chosen) / sum(math.prod(q.shape)
                                                                                        for q in chosen)
    return model, {"init_seconds": seconds, "bits_per_parameter": bits,
                   "configs": dict(collections.Counter(q.config.name for q in chosen))}


def measure(system: str, steps: int, batch: int, tokens: int, base: str = "smollm2-135m",
            adapter_dir: Path | None = None) -> dict:
    """One system's weight bytes, saved-for-backward bytes, seconds per step and peak RSS."""
    from lorakit.optim.adamw_8bit import adamw_8bit, optimizer_state_bytes
    from lorakit.quant.quantized_loading import load_base
    torch.manual_seed(0)
    config = lorakit.LoraConfig(rank=16, alpha=32, targets="all-linear")
    set_up = {}
    if system in LQ_LORA_SYSTEMS:
        model, set_up = lq_lora_model(system, base, config, adapter_dir)
        weight_bytes, whole_bytes = base_weight_bytes(model), model_bytes(model) - adapter_bytes(model)
    else:
        model, _ = load_base(base, None if system == "fp32" else system.split("-")[0])
        weight_bytes, whole_bytes = base_weight_bytes(model), model_bytes(model)
        lorakit.attach(model, config)
    model.train()
    parameters = list(lorakit.trainable_parameters(model).values())
    optimizer = (adamw_8bit(parameters, lr=1e-4, weight_decay=0.0) if system.endswith("adamw8bit")
                 else torch.optim.AdamW(parameters, lr=1e-4))
    ids = torch.randint(100, min(20000, model.config.vocab_size), (batch, tokens),
                        generator=torch.Generator().manual_seed(1))
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
            "peak_rss_mib": peak_resident_mib(), **set_up}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--base", default="smollm2-135m", help=argparse.SUPPRESS)  # memory_scaling.py's model
    parser.add_argument("--system", choices=(*SYSTEMS, *LQ_LORA_SYSTEMS), help=argparse.SUPPRESS)  # one run
    parser.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)  # the LQ-LoRA systems' directory
    args = parser.parse_args()
    if args.system:
        print(json.dumps(measure(args.system, args.steps, args.batch, args.tokens, args.base, args.adapter_dir)))
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
