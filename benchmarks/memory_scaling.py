"""The quantization study's memory scaling: a randomly initialised ~1.1B-parameter Llama, where weights dominate.

TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 22 layers, 32 query and 4 key/value heads) with the default model's
tokenizer (vocabulary 49,152, untied head), random weights saved once as safetensors under ``--workdir``. Each
system then runs in its own subprocess exactly as ``benchmarks/quantized_training.py`` measures the default model
(LoRA r = 16, alpha = 32 on every decoder linear, AdamW, ``--batch`` x ``--tokens`` random tokens): ``fp32``, and
``nf4`` quantized as it loads (``lorakit train --quantize nf4``, never holding the fp32 model), twice: the first
run quantizes and writes the cache (``nf4-first-load``), the second reads it (``nf4``). Reported: the
decoder linears' bytes, the whole model's bytes (embeddings and head stay fp32), peak RSS (loading included) and
seconds per step. LQ-LoRA at 2.75 bits runs twice: ``lq-lora-2.75-init`` reads the fp32 model, sweeps the small grid
(8 configurations x 154 matrices, one alternation per decomposition), allocates the bits, saves the adapter with its
quantized bases under ``--workdir`` and trains, as ``lorakit train --init lq-lora --quant-iterations 1`` would;
``lq-lora-2.75`` loads that directory (the base built with its quantized linears in place) and trains. Random
weights say nothing about quality; only bytes and memory are claimed. Results go to
``docs/results/memory_scaling.json``.

    .venv/bin/python benchmarks/memory_scaling.py [--workdir /tmp/lorakit-1b] [--steps 2] [--batch 1] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import emit
from lorakit.models.load import load_tokenizer, resolve_source

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "memory_scaling.json"
HERE = Path(__file__).resolve().parent
RUNS = (("fp32", "fp32"), ("nf4-first-load", "nf4"), ("nf4", "nf4"), ("lq-lora-2.75-init", "lq-lora-2.75-init"),
        ("lq-lora-2.75", "lq-lora-2.75"))
"""(name, system) pairs: the second NF4 run reads the base that the first quantized and cached; the second LQ-LoRA
run loads the adapter and quantized bases that the first decomposed and saved."""
RATIOS = ("linear_weight_bytes", "model_bytes", "peak_rss_mib", "seconds_per_step")
"""What the summary divides by fp32's."""
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "vocab_size": 49152, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}


def build_model(directory: Path) -> int:
    """Save the random model (and the default model's tokenizer) to ``directory``; return its parameter count."""
    if (directory / "config.json").is_file():
        return json.loads((directory / "parameters.json").read_text())["parameters"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, safe_serialization=True)
    load_tokenizer(resolve_source("smollm2-135m"), "smollm2-135m").save_pretrained(directory)
    (directory / "parameters.json").write_text(json.dumps({"parameters": parameters}))
    return parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-1b"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parameters = build_model(args.workdir / "model")
    environment = {**os.environ, "LORAKIT_HOME": str(args.workdir / "home")}  # the NF4 cache stays in the workdir
    results = {"benchmark": "benchmarks/memory_scaling.py", "shape": SHAPE, "parameters": parameters,
               "batch": args.batch, "tokens": args.tokens, "steps": args.steps, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "systems": {}}
    shutil.rmtree(args.workdir / "home", ignore_errors=True)  # the first NF4 run quantizes
    for name, system in RUNS:
        out = subprocess.run([sys.executable, str(HERE / "quantized_training.py"), "--system", system, "--base",
                              str(args.workdir / "model"), "--steps", str(args.steps), "--batch", str(args.batch),
                              "--tokens", str(args.tokens), "--adapter-dir", str(args.workdir / "lq-lora-2.75")],
                             check=True, capture_output=True, text=True, env=environment).stdout
        results["systems"][name] = {**json.loads(out.strip().splitlines()[-1]), "system": name}
        emit(results["systems"][name])
    systems = results["systems"]
    fp32 = systems["fp32"]
    results["summary"] = {name: {key: systems[name][key] / fp32[key] for key in RATIOS}
                          for name, _ in RUNS if name != "fp32"}
    emit(results["summary"])
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
