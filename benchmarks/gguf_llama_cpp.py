"""llama.cpp itself on lorakit's GGUF exports of the default model: logits against the merged float32 model.

Default model (SmolLM2-135M-Instruct) with a random rank-8 adapter on every linear (A, B ~ N(0, 0.02^2), seeded),
merged and exported with ``lorakit.io.gguf_export.export_gguf`` at ``f16``, ``q8_0`` and ``q4_0``; the base exported
at ``f16`` with the adapter as a GGUF LoRA file (``export_gguf_lora``) beside it. Each file is run by llama.cpp
(``llama-cpp-python``, one thread) and read back by transformers' GGUF loader, on three chat prompts; reported per
file: the largest logit difference from the merged float32 model over the largest logit, and the share of
positions whose top token agrees. Needs ``llama-cpp-python`` (``make venv`` builds it). Results go to
``docs/results/gguf.json``.

    .venv/bin/python benchmarks/gguf_llama_cpp.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import lorakit
from common import emit, random_adapter
from lorakit.io.gguf_export import export_gguf
from lorakit.io.gguf_lora import export_gguf_lora

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "gguf.json"
PROMPTS = ("What is the capital of France?", "Write the date 2024-03-07 as 7 March 2024.",
           "Translate 'good morning' into Spanish.")


def llama_cpp_logits(model_file: Path, ids: list[int], lora_file: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits (T, vocab) for ``ids``."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(model_file), lora_path=None if lora_file is None else str(lora_file), n_ctx=256,
                n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def agreement(found: torch.Tensor, expected: torch.Tensor) -> dict:
    """The largest logit difference over the largest logit, and the share of equal top tokens."""
    return {"max_abs_difference_over_max_abs_logit": float((found - expected).abs().max() / expected.abs().max()),
            "top_token_agreement": float((found.argmax(-1) == expected.argmax(-1)).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model, tokenizer = lorakit.load_model()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in PROMPTS]
    prompts = [ids if isinstance(ids, list) else ids["input_ids"] for ids in prompts]
    results = {"benchmark": "benchmarks/gguf_llama_cpp.py", "model": "smollm2-135m", "adapter": "rank 8, all-linear",
               "positions": sum(map(len, prompts)), "files": {}}
    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-") as scratch:
        root = Path(scratch)
        base_file = export_gguf(model, tokenizer, root / "base.gguf", progress=False)
        adapter = random_adapter(model, lorakit.LoraConfig(rank=8, alpha=16, targets="all-linear"), "default", root,
                                 torch.Generator().manual_seed(0))
        lora_file = export_gguf_lora(adapter, root / "adapter.gguf", config=model.config)
        lorakit.set_active(model, "default")
        merged = lorakit.merge_and_unload(model)
        with torch.no_grad():
            expected = [merged(torch.tensor([ids])).logits[0] for ids in prompts]
        files = {quant: export_gguf(merged, tokenizer, root / f"merged-{quant}.gguf", quant=quant, progress=False)
                 for quant in ("f16", "q8_0", "q4_0")}
        for quant, path in files.items():
            read = AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
            with torch.no_grad():
                transformers_logits = [read(torch.tensor([ids])).logits[0] for ids in prompts]
            llama_logits = [llama_cpp_logits(path, ids) for ids in prompts]
            results["files"][f"merged {quant}"] = {
                "bytes": path.stat().st_size,
                "llama_cpp": agreement(torch.cat(llama_logits), torch.cat(expected)),
                "transformers_gguf_reader": agreement(torch.cat(transformers_logits), torch.cat(expected))}
            emit({"file": f"merged {quant}", **results["files"][f"merged {quant}"]})
        with_lora = [llama_cpp_logits(base_file, ids, lora_file) for ids in prompts]
        results["files"]["base f16 + LoRA file"] = {"bytes": lora_file.stat().st_size,
                                                    "llama_cpp": agreement(torch.cat(with_lora), torch.cat(expected))}
        emit({"file": "base f16 + LoRA file", **results["files"]["base f16 + LoRA file"]})
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
