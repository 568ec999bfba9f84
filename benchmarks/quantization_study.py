"""The quantization study, part 1: how much each quantized base costs in perplexity right after quantization.

Default model (SmolLM2-135M-Instruct, fp32, CPU), LoRA r = 16, alpha = 32 on every linear of the decoder blocks
where a system starts an adapter. Perplexity (``lorakit.eval.corpus_perplexity``, windows of ``--window``
tokens) on the offline English corpus (``lorakit.data.offline_corpus``: the standard library's docstrings, about
59K tokens), which no system trains on. The systems, each as training would start from it:

* ``fp32``: the base;
* ``qlora-nf4``: every decoder linear NF4 in blocks of 64, scales double-quantized to 8 bits (the adapter starts at
  B = 0, so it changes nothing);
* ``loftq``: NF4 in blocks of 64 with the adapter started at LoftQ's ``W - Q`` (one alternation), ``Q + L1 L2``;
* ``lq-lora-<b>``: LQ-LoRA's decomposition ``Q + L1 L2`` with the bit allocation at ``b`` bits per parameter over
  the small grid, ``--iterations`` alternations per matrix (one cost sweep serves every budget);
* ``l4q-<b>``: L4Q's fake-quantized ``W0 + s B A`` at ``b`` bits in groups of 128 at the start of training (B = 0):
  round-to-nearest with min-max steps and offsets.

Each system reports its decoder linears' bits per parameter and bytes (codes and scales; the embeddings and
norms stay in full precision), the perplexity and how long building it took. Results go to
``docs/results/quantization_study.json``.

    .venv/bin/python benchmarks/quantization_study.py [--window 512] [--iterations 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import lorakit
from common import emit
from lorakit.core.state import lora_layers
from lorakit.data.offline_corpus import corpus_fingerprint, english_corpus
from lorakit.eval.corpus_perplexity import corpus_ids, corpus_perplexity
from lorakit.init.lq_lora import SMALL_GRID, decomposition_costs, init_loftq, mixed_decompositions, start_from
from lorakit.init.lq_lora.lq_lora_init import adapted_layers
from lorakit.models.skeleton import causal_lm_skeleton
from lorakit.quant import NFLinear, bits_per_parameter, load_quantized_base
from lorakit.quant.l4q import attach_l4q

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "quantization_study.json"
LORA = lorakit.LoraConfig(rank=16, alpha=32, targets="all-linear")
BUDGETS = (4.0, 3.0, 2.75, 2.5)
L4Q_BITS = (4, 3)
L4Q_GROUP = 128


def _adapted():
    model, tokenizer = lorakit.load_model()
    lorakit.attach(model, LORA)
    return model, tokenizer


def _decoder_linear_parameters(model) -> int:
    return sum(layer.base_layer.in_features * layer.base_layer.out_features for _, layer in lora_layers(model))


def _nf_bits(decompositions, parameters: int) -> float:
    return sum(bits_per_parameter(d.quantized.config) * d.quantized.shape[0] * d.quantized.shape[1]
               for d in decompositions.values()) / parameters


def build_systems(iterations: int):
    """``(name, build)`` pairs; ``build()`` returns ``(model, tokenizer, bits per decoder-linear parameter)``."""
    def fp32():
        model, tokenizer = lorakit.load_model()
        return model, tokenizer, 32.0

    def qlora():
        model, tokenizer = load_quantized_base("smollm2-135m", "nf4")
        return model, tokenizer, bits_per_parameter(next(m for m in model.modules() if isinstance(m, NFLinear)).config)

    def loftq():
        model, tokenizer = _adapted()
        decompositions = init_loftq(model, progress=False)
        return model, tokenizer, _nf_bits(decompositions, _decoder_linear_parameters(model))

    shared = {}

    def lq_lora(budget):
        def build():
            model, tokenizer = _adapted()
            layers = adapted_layers(model, "default")
            weights = {name: layer.base_layer.weight for name, layer in layers.items()}
            ranks = {name: layer.adapters["default"].rank for name, layer in layers.items()}
            if "costs" not in shared:
                started = time.perf_counter()
                shared["costs"] = decomposition_costs(weights, ranks, SMALL_GRID, max_iterations=iterations)
                shared["sweep_seconds"] = time.perf_counter() - started
            decompositions = mixed_decompositions(weights, ranks, SMALL_GRID, budget, max_iterations=iterations,
                                                  costs=shared["costs"], progress=False)
            start_from(model, decompositions)
            return model, tokenizer, _nf_bits(decompositions, sum(w.numel() for w in weights.values()))
        return build

    def l4q(bits):
        def build():
            model, tokenizer = _adapted()
            attach_l4q(model, bits=bits, group_size=L4Q_GROUP)
            return model, tokenizer, bits + 2 * 32 / L4Q_GROUP  # codes, a float32 step and offset per group
        return build

    return [("fp32", fp32), ("qlora-nf4", qlora), ("loftq", loftq),
            *[(f"lq-lora-{b:g}", lq_lora(b)) for b in BUDGETS], *[(f"l4q-{b}", l4q(b)) for b in L4Q_BITS]], shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=10, help="LQ-LoRA alternations per matrix")
    parser.add_argument("--documents", type=int, default=None, help="only the first N documents (a quick check)")
    parser.add_argument("--systems", default=None, help="comma-separated system names (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    documents = english_corpus()[:args.documents]
    systems, shared = build_systems(args.iterations)
    if args.systems:
        systems = [(name, build) for name, build in systems if name in args.systems.split(",")]
    results = {"benchmark": "benchmarks/quantization_study.py", "part": "perplexity right after quantization",
               "model": "smollm2-135m", "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(),
               "corpus": {"source": "Python standard library docstrings (lorakit.data.offline_corpus)",
                          "documents": len(documents), "characters": sum(map(len, documents)),
                          "fingerprint": corpus_fingerprint(documents)},
               "window": args.window, "lq_lora_iterations": args.iterations, "lora": {"rank": 16, "alpha": 32},
               "systems": {}}
    linear_parameters = None
    for name, build in systems:
        started = time.perf_counter()
        with torch.no_grad():
            model, tokenizer, bits = build()
        built = time.perf_counter() - started
        if linear_parameters is None:
            results["corpus"]["tokens"] = int(corpus_ids(tokenizer, documents).numel())
            skeleton = causal_lm_skeleton(model.config)  # the unquantized shapes, on the meta device
            linear_parameters = sum(m.weight.numel() for n, m in skeleton.named_modules()
                                    if ".layers." in n and isinstance(m, torch.nn.Linear))
        model.eval()
        started = time.perf_counter()
        measured = corpus_perplexity(model, tokenizer, documents, window=args.window)
        record = {"system": name, "bits_per_parameter": bits, "linear_weight_bytes": bits * linear_parameters / 8,
                  "linear_bytes_vs_fp32": bits / 32, "perplexity": measured.perplexity, "nll": measured.nll,
                  "predicted_tokens": measured.tokens, "build_seconds": built,
                  "perplexity_seconds": time.perf_counter() - started}
        emit(record)
        results["systems"][name] = record
        del model
    results["lq_lora_sweep_seconds"] = shared.get("sweep_seconds")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
