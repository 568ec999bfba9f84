"""X-LoRA generation speed: base model, plain LoRA, lorakit X-LoRA and PEFT X-LoRA, same run.

Default model (SmolLM2-135M-Instruct, fp32, CPU), 3 random non-zero LoRA experts (r = 16, alpha = 32,
all-linear; timing needs no training), a ~64-token prompt, greedy decoding of 32 new tokens (EOS
suppressed so that every run decodes exactly that many). For each method:

* ``prefill_s``: the median time of a generation of 1 new token (the prompt's forward pass(es) and
  the loop's overhead);
* ``per_token_s``: ``(median t(32 new) - median t(1 new)) / 31``, the cost of one more token;
* ratios to the base model (``transformers`` ``generate`` with a KV cache).

Methods: the base model; the base model in lorakit's X-LoRA decoding loop (to separate the loop's
cost from the mixture's); one plain LoRA adapter; lorakit X-LoRA (a KV cache per pass); lorakit
X-LoRA with ``reuse_prompt_scalings`` (one pass per new token); lorakit X-LoRA with ``top_k=1``;
PEFT X-LoRA (its ``generate``, which turns the cache off). Repeats run round-robin over the
methods so that machine noise falls evenly. Then the real pass with 64 experts and ``top_k=2``,
sparse vs dense with the other scalings zeroed, for a batch of 4 x 64 tokens and for one token.
Prints one JSON line per measurement and a final summary line; results in
``docs/results/xlora_benchmark.md``.

    .venv/bin/python benchmarks/xlora.py [--repeats 3] [--new-tokens 32] [--many-experts 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

import lorakit
from lorakit.core.state import lora_layers
from lorakit.mixtures.xlora.config import XLoraConfig
from lorakit.mixtures.xlora.generation import generate as xlora_generate
from lorakit.mixtures.xlora.model import XLoraModel

RANK, ALPHA, PROMPT_TOKENS = 16, 32, 64
PROMPT = ("Summarise the following notes for a colleague. The quarterly report shows that revenue grew in "
          "every region except the north, where two large customers delayed their orders. Costs stayed flat, "
          "hiring was slower than planned, and the new product line will ship a month late because of a "
          "supplier problem that is now solved. The team asks for a decision on the marketing budget.")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def random_experts(model, names: list[str], root: Path, seed: int) -> dict[str, Path]:
    """Attach, randomise (A and B non-zero), save and remove one all-linear expert per name."""
    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for name in names:
        lorakit.attach(model, lorakit.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear"), name,
                       activate=False, trainable=False)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                adapter = layer.adapters[name]
                adapter.A.copy_(torch.randn(adapter.A.shape, generator=generator) * 0.02)
                adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.02)
        paths[name] = lorakit.save_adapter(model, root / name, name)
        lorakit.delete_adapter(model, name)
    return paths


class PlainStep:
    """A plain causal LM behind the interface lorakit's X-LoRA loop drives (no scalings)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, scalings=None, **inputs):
        out = self.model(**inputs)
        return SimpleNamespace(logits=out.logits, past_key_values=out.past_key_values, scalings=None)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def generation_benchmark(args, base, lora_model, peft_model, experts, tokenizer) -> dict[str, dict]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    mask = torch.ones_like(ids)
    config = XLoraConfig(layerwise_scalings=True)
    xmodel = XLoraModel(lora_model, experts, config).eval()
    xsparse = XLoraModel(lora_model, experts, XLoraConfig(layerwise_scalings=True, top_k=1)).eval()
    xsparse.classifier.load_state_dict(xmodel.classifier.state_dict())
    peft_model.base_model.internal_xlora_classifier.layers.load_state_dict(xmodel.classifier.layers.state_dict())
    hf = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def hf_generate(model, n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **hf)

    def plain_lora(n):
        with lorakit.active(lora_model, experts[0]):
            return hf_generate(lora_model, n)

    methods = {
        "base": lambda n: hf_generate(base, n),
        "base_lorakit_loop": lambda n: xlora_generate(PlainStep(base), ids, mask, max_new_tokens=n),
        "plain_lora": plain_lora,
        "lorakit_xlora": lambda n: xmodel.generate(ids, mask, max_new_tokens=n, use_cache=True),
        "lorakit_xlora_reuse_prompt_scalings": lambda n: xmodel.generate(ids, mask, max_new_tokens=n,
                                                                         reuse_prompt_scalings=True),
        "lorakit_xlora_top1": lambda n: xsparse.generate(ids, mask, max_new_tokens=n, use_cache=True),
        "peft_xlora": lambda n: hf_generate(peft_model, n),
    }
    with torch.no_grad():
        outputs = {name: fn(args.new_tokens) for name, fn in methods.items()}  # warm-up, and the tokens
        for fn in methods.values():
            fn(1)
        times: dict[str, dict[int, list[float]]] = {name: {1: [], args.new_tokens: []} for name in methods}
        for repeat in range(args.repeats):
            for name, fn in methods.items():
                for n in (1, args.new_tokens):
                    seconds = timed(partial(fn, n))
                    times[name][n].append(seconds)
                    emit({"measurement": "generate", "method": name, "new_tokens": n, "repeat": repeat,
                          "seconds": round(seconds, 4)})
    results = {}
    for name in methods:
        prefill = statistics.median(times[name][1])
        total = statistics.median(times[name][args.new_tokens])
        results[name] = {"prefill_s": prefill, "total_s": total,
                         "per_token_s": (total - prefill) / (args.new_tokens - 1),
                         "new_tokens": outputs[name].shape[1] - ids.shape[1]}
    base_result = results["base"]
    for name, result in results.items():
        result["prefill_ratio"] = result["prefill_s"] / base_result["prefill_s"]
        result["per_token_ratio"] = result["per_token_s"] / base_result["per_token_s"]
        emit({"measurement": "generate_summary", "method": name, "prompt_tokens": ids.shape[1],
              **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}})
    same = bool(torch.equal(outputs["lorakit_xlora"], outputs["peft_xlora"]))
    emit({"measurement": "check", "lorakit_xlora_tokens_equal_peft_xlora": same,
          "plain_lora_tokens_differ_from_base": not torch.equal(outputs["plain_lora"], outputs["base"])})
    results["tokens_equal_peft"] = same
    return results


def forward_runs(sparse: XLoraModel, dense: XLoraModel, ids, scalings, masked) -> dict:
    """The forwards :func:`sparse_benchmark` times on one batch: the sparse real pass, the dense one with the
    other scalings zeroed (``masked``), and the sparse model's full forward (scaling pass included)."""
    return {"sparse_top2": lambda: sparse(ids, scalings=scalings).logits,
            "dense_masked": lambda: dense(ids, scalings=masked).logits,
            "full_forward_sparse_top2": lambda: sparse(ids).logits}


def sparse_benchmark(args, lora_model, tokenizer, root: Path) -> list[dict]:
    """Many experts, top_k=2: the sparse real pass vs the dense real pass with the other scalings zeroed,
    for a batch of prompts and for a single token (the decoding case)."""
    names = [f"m{i}" for i in range(args.many_experts)]
    for name, path in random_experts(lora_model, names, root, seed=1).items():
        lorakit.load_adapter(lora_model, path, name, activate=False)
    sparse = XLoraModel(lora_model, names, XLoraConfig(layerwise_scalings=True, top_k=2)).eval()
    dense = XLoraModel(lora_model, names, XLoraConfig(layerwise_scalings=True)).eval()
    dense.classifier.load_state_dict(sparse.classifier.state_dict())
    generator = torch.Generator().manual_seed(2)
    records = []
    for shape in ((args.sparse_batch, PROMPT_TOKENS), (1, 1)):
        ids = torch.randint(0, tokenizer.vocab_size, shape, generator=generator)
        with torch.no_grad():
            scalings = sparse(ids).scalings  # (B, S, L, N), from the scaling pass and the classifier
            kept = scalings.topk(2, dim=-1).indices
            masked = torch.zeros_like(scalings).scatter(-1, kept, scalings.gather(-1, kept))
            runs = forward_runs(sparse, dense, ids, scalings, masked)
            logits = {name: fn() for name, fn in runs.items()}  # warm-up
            repeats = args.repeats if ids.numel() > 1 else 5 * args.repeats
            times = {name: [] for name in runs}
            for _ in range(repeats):
                for name, fn in runs.items():
                    times[name].append(timed(fn))
        for name, values in times.items():
            emit({"measurement": "forward", "method": name, "experts": len(names), "batch": list(shape),
                  "seconds": [round(v, 4) for v in values]})
        median = {name: statistics.median(values) for name, values in times.items()}
        record = {"measurement": "sparse_vs_dense", "experts": len(names), "top_k": 2, "batch": list(shape),
                  "sparse_real_pass_s": round(median["sparse_top2"], 4),
                  "dense_real_pass_s": round(median["dense_masked"], 4),
                  "full_forward_sparse_s": round(median["full_forward_sparse_top2"], 4),
                  "dense_over_sparse": round(median["dense_masked"] / median["sparse_top2"], 3),
                  "max_abs_logit_difference": (logits["sparse_top2"] - logits["dense_masked"]).abs().max().item()}
        emit(record)
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--many-experts", type=int, default=64)
    parser.add_argument("--sparse-batch", type=int, default=4)
    args = parser.parse_args()

    import peft

    started = time.perf_counter()
    base, tokenizer = lorakit.load_model()
    lora_model, _ = lorakit.load_model()
    peft_base, _ = lorakit.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = random_experts(lora_model, ["e0", "e1", "e2"], root, seed=0)
        experts = list(paths)
        for name, path in paths.items():
            lorakit.load_adapter(lora_model, path, name, activate=False)
        peft_base.config.use_cache = False  # peft.XLoraModel refuses use_cache=True
        peft_model = peft.get_peft_model(peft_base, peft.XLoraConfig(
            task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, layerwise_scalings=True,
            adapters={str(i): str(paths[name]) for i, name in enumerate(experts)})).eval()  # keys "0".."N-1"
        generation = generation_benchmark(args, base, lora_model, peft_model, experts, tokenizer)
        del peft_model, peft_base
        sparse = sparse_benchmark(args, lora_model, tokenizer, root)
    xlora = generation["lorakit_xlora"]["per_token_ratio"]
    emit({"measurement": "summary", "threads": torch.get_num_threads(), "dtype": "float32",
          "torch": torch.__version__, "peft": peft.__version__,
          "per_token_ratio_vs_base": {name: round(r["per_token_ratio"], 3) for name, r in generation.items()
                                      if isinstance(r, dict)},
          "prefill_ratio_vs_base": {name: round(r["prefill_ratio"], 3) for name, r in generation.items()
                                    if isinstance(r, dict)},
          "lorakit_xlora_target_met": xlora <= 2.3,
          "reuse_prompt_scalings_over_plain_lora": round(
              generation["lorakit_xlora_reuse_prompt_scalings"]["per_token_s"]
              / generation["plain_lora"]["per_token_s"], 3),
          "peft_over_lorakit_per_token": round(generation["peft_xlora"]["per_token_s"]
                                               / generation["lorakit_xlora"]["per_token_s"], 3),
          "tokens_equal_peft": generation["tokens_equal_peft"],
          "dense_over_sparse": {"x".join(map(str, r["batch"])): r["dense_over_sparse"] for r in sparse},
          "sparse_max_abs_logit_difference": max(r["max_abs_logit_difference"] for r in sparse),
          "wall_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
