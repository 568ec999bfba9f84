"""LoRA training throughput and peak memory: lorakit vs peft on the default model, same run.

Same configuration for both (all-linear, r = 16, alpha = 32, dropout 0, batch 8, AdamW, fp32 on the
CPU); each library computes its loss its own way: peft through the model's ``labels`` loss (full
logits), lorakit through its trainer's loss (:func:`lorakit.train.loss.supervised_outputs`). Data:
``--data random`` is 8 x 128 random tokens, every one supervised; ``--data sft`` is 8 chat-formatted
examples of the built-in ``date`` task with their prompts masked (-100), as in instruction tuning.
Each measurement runs in its own subprocess so that peak memory (max RSS) is that library's alone;
runs alternate between the libraries to spread machine noise evenly. Prints one JSON line per
measurement and a final line with the ratios.

    .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--repeats 2] [--data random|sft]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

BATCH, LENGTH, RANK, ALPHA = 8, 128, 16, 32


def batch_of(data: str, tokenizer) -> dict:
    """The benchmark's one batch: ``input_ids``, ``attention_mask`` and ``labels``."""
    import torch

    if data == "random":
        ids = torch.randint(0, 49152, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    from lorakit.data.batching import collate
    from lorakit.data.encoding import encode, pad_id
    from lorakit.data.tasks import get_task
    encoded = [encode(e, tokenizer, chat=True, max_length=LENGTH) for e in get_task("date").examples("train", BATCH)]
    return collate(encoded, pad_id=pad_id(tokenizer))


def measure(library: str, steps: int, data: str) -> dict:
    """Train ``steps`` steps (after 2 warm-up steps) with ``library``; tokens/s and peak RSS."""
    import torch

    from lorakit.models import load_model

    model, tokenizer = load_model()
    batch = batch_of(data, tokenizer)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if library == "lorakit":
        import lorakit
        lorakit.attach(model, lorakit.LoraConfig(rank=RANK, alpha=ALPHA, targets="all-linear"))
        parameters = list(lorakit.trainable_parameters(model).values())
    else:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
        parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def loss_of() -> torch.Tensor:
        if library == "peft":
            return model(**batch).loss
        from lorakit.train.loss import logits_loss, supervised_outputs, supervised_tokens
        return logits_loss(supervised_outputs(model, batch)) / supervised_tokens(batch)

    def step() -> None:
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = int(batch["attention_mask"].sum())
    return {"library": library, "data": data, "tokens_per_s": steps * tokens / seconds,
            "seconds_per_step": seconds / steps, "peak_rss_mib": peak_kib / 1024, "training_rss_mib": (peak_kib - baseline_kib) / 1024,
            "trainable_parameters": sum(p.numel() for p in parameters), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", choices=["random", "sft"], default="random")
    parser.add_argument("--child", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.data)))
        return
    results: dict[str, list[dict]] = {"lorakit": [], "peft": []}
    for _ in range(args.repeats):
        for library in ("peft", "lorakit"):
            out = subprocess.run([sys.executable, __file__, "--child", library, "--steps", str(args.steps),
                                  "--data", args.data],
                                 check=True, capture_output=True, text=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            results[library].append(record)
            print(json.dumps(record), flush=True)
    speed = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    memory = {k: statistics.median(r["peak_rss_mib"] for r in v) for k, v in results.items()}
    print(json.dumps({"summary": "train_throughput", "data": args.data, "batch": BATCH, "length": LENGTH, "rank": RANK,
                      "lorakit_tokens_per_s": speed["lorakit"], "peft_tokens_per_s": speed["peft"],
                      "speed_ratio_lorakit_over_peft": speed["lorakit"] / speed["peft"],
                      "lorakit_peak_rss_mib": memory["lorakit"], "peft_peak_rss_mib": memory["peft"],
                      "memory_ratio_lorakit_over_peft": memory["lorakit"] / memory["peft"]}))


if __name__ == "__main__":
    main()
