"""Inference cost of one adapter over the base model: lorakit vs PEFT, unmerged and merged, same run.

Default model (SmolLM2-135M-Instruct, fp32, CPU). Adapters with random non-zero weights, saved once
and loaded by both libraries: ``all16`` (all-linear, r = 16, alpha = 32: about 4.6% extra forward
FLOPs) and ``qkv8`` (q/k/v, r = 8, alpha = 16). Systems: the plain base model (no wrappers), each
library with each adapter unmerged, and each library with ``all16`` merged into the base weights
(lorakit: ``merge``, which keeps the adapter unmergeable; PEFT: ``merge_adapter``). Measured
``--repeats`` times, round-robin over the systems, under ``torch.inference_mode``:

* ``forward``: one forward of 4 rows x 128 tokens (prefill);
* ``generate``: ``--new-tokens`` greedy tokens for one row after a 32-token prompt, with the KV cache
  (decoding dominates: the prompt is one forward of 32 tokens).

Each measurement of a system is paired with one of the base model right before it, and the ratio
reported is the median of the paired ratios: this shared machine's load drifts by tens of percent
within minutes, and a pair shares it. Also checks that the two libraries' logits agree.
Prints JSON lines and a final summary; results in ``docs/results/performance.md``.

    .venv/bin/python benchmarks/inference_overhead.py [--repeats 9] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import peft
import torch

import lorakit
from common import emit, random_adapter, timed

ADAPTERS = {"all16": lorakit.LoraConfig(rank=16, alpha=32, targets="all-linear"),
            "qkv8": lorakit.LoraConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj"))}
ROWS, TOKENS, PROMPT = 4, 128, 32


def build_systems(root: Path) -> dict:
    """``name -> (model, adapter to activate or None)`` for every system; adapters saved under ``root``."""
    generator = torch.Generator().manual_seed(0)
    ours, _ = lorakit.load_model()
    paths = {name: random_adapter(ours, config, name, root, generator) for name, config in ADAPTERS.items()}
    theirs = peft.PeftModel.from_pretrained(lorakit.load_model()[0], paths["all16"], adapter_name="all16")
    theirs.load_adapter(paths["qkv8"], adapter_name="qkv8")
    ours_merged, _ = lorakit.load_model()
    lorakit.load_adapter(ours_merged, paths["all16"], "all16")
    lorakit.merge(ours_merged, ["all16"])
    theirs_merged = peft.PeftModel.from_pretrained(lorakit.load_model()[0], paths["all16"], adapter_name="all16")
    theirs_merged.merge_adapter()
    systems = {"base": (lorakit.load_model()[0], None)}
    for name in ADAPTERS:
        systems[f"lorakit_{name}"] = (ours, name)
        systems[f"peft_{name}"] = (theirs, name)
    systems["lorakit_merged_all16"] = (ours_merged, None)
    systems["peft_merged_all16"] = (theirs_merged, None)
    return systems


def activate(model, adapter: str | None) -> None:
    if adapter is None:
        return
    if isinstance(model, peft.PeftModel):
        model.set_adapter(adapter)
    else:
        lorakit.set_active(model, adapter)


def check_logits(systems: dict, ids: torch.Tensor) -> dict[str, float]:
    """The largest logit difference between lorakit and PEFT for each adapter, and merged vs unmerged."""
    def logits(name: str) -> torch.Tensor:
        model, adapter = systems[name]
        activate(model, adapter)
        return model(input_ids=ids).logits

    checks = {f"{name}_lorakit_vs_peft": float((logits(f"lorakit_{name}") - logits(f"peft_{name}")).abs().max())
              for name in ADAPTERS}
    checks["merged_vs_unmerged_lorakit"] = float((logits("lorakit_merged_all16") - logits("lorakit_all16")).abs().max())
    return checks


def measure(systems: dict, repeats: int, new_tokens: int) -> dict[str, dict[str, float]]:
    """Each system's forward and generation timed right after the base model's, ``repeats`` times; the
    medians of the paired ratios (a pair shares the machine's momentary state, so drifting load on a
    shared machine cancels) and of the times."""
    batch = torch.randint(100, 20000, (ROWS, TOKENS), generator=torch.Generator().manual_seed(1))
    prompt = batch[:1, :PROMPT]

    def calls(model, adapter):
        def forward():
            activate(model, adapter)
            model(input_ids=batch)

        def generate():
            activate(model, adapter)
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return {"forward": forward, "generate": generate}

    work = {name: calls(*system) for name, system in systems.items()}
    for fns in work.values():  # warm-up
        for fn in fns.values():
            fn()
    times = {name: {"forward": [], "generate": []} for name in work}
    ratios = {name: {"forward": [], "generate": []} for name in work}
    for repeat in range(repeats):
        for name, fns in work.items():
            for key, fn in fns.items():
                base, seconds = timed(work["base"][key]), timed(fn)
                times[name][key].append(seconds)
                ratios[name][key].append(seconds / base)
                emit({"measurement": key, "system": name, "repeat": repeat, "seconds": round(seconds, 4),
                      "base_seconds": round(base, 4)})
    return {name: {"forward_s": statistics.median(times[name]["forward"]),
                   "generate_s": statistics.median(times[name]["generate"]),
                   "forward_vs_base": statistics.median(ratios[name]["forward"]),
                   "generate_vs_base": statistics.median(ratios[name]["generate"])} for name in work}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root, torch.inference_mode():
        systems = build_systems(Path(root))
        for model, _ in systems.values():
            model.eval()
        emit({"measurement": "check", **check_logits(systems, torch.randint(100, 20000, (2, 16)))})
        results = measure(systems, args.repeats, args.new_tokens)
    summary = {"threads": torch.get_num_threads(), "rows": ROWS, "tokens": TOKENS, "new_tokens": args.new_tokens}
    for name, result in results.items():
        summary[name] = {"tokens_per_s": round(args.new_tokens / result["generate_s"], 2),
                         **{k: round(v, 4) for k, v in result.items()}}
        emit({"measurement": "summary_row", "system": name, **summary[name]})
    emit({"measurement": "summary", **summary})


if __name__ == "__main__":
    main()
