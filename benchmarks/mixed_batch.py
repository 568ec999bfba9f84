"""Mixed batches: one adapter per row, lorakit's stacked path against PEFT's ``adapter_names``, same run.

Default model (SmolLM2-135M-Instruct, fp32, CPU), 32 random non-zero adapters (r = 8, alpha = 16,
targets q_proj, k_proj, v_proj; timing needs no training), a batch of 32 rows of ``--tokens`` tokens.
The rows are spread round-robin over 1, 4, 16 and 32 distinct adapters. Measured, as medians over
``--repeats`` round-robin repeats:

* ``forward``: one full forward of the batch (prefill), under ``torch.no_grad``;
* ``per_token``: one more greedy token for all 32 rows with the KV cache,
  ``(t(generate 1 + --new-tokens) - t(generate 1)) / --new-tokens``.

Ratios are to the base model's own forward / token in the same run, and to the same system with one
adapter for every row. Prints one JSON line per measurement and a final summary line; results in
``docs/results/mixed_batch.md``.

    .venv/bin/python benchmarks/mixed_batch.py [--repeats 3] [--tokens 64] [--new-tokens 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import lorakit
from common import emit, random_adapter, timed

RANK, ALPHA, TARGETS, ROWS, ADAPTERS = 8, 16, ("q_proj", "k_proj", "v_proj"), 32, 32
DISTINCT = (1, 4, 16, 32)


def random_adapters(model, root: Path) -> list[Path]:
    """Attach 32 random non-zero adapters to ``model`` and save each (PEFT loads the same files)."""
    generator = torch.Generator().manual_seed(0)
    config = lorakit.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    return [random_adapter(model, config, f"a{index}", root, generator) for index in range(ADAPTERS)]


def peft_model(paths: list[Path]):
    import peft
    base, _ = lorakit.load_model()
    model = peft.PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    for index, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{index}")
    return model.eval()


def rows_for(distinct: int) -> list[str]:
    return [f"a{row % distinct}" for row in range(ROWS)]


def systems(lorakit_model, peft, ids, mask, new_tokens: int) -> dict:
    """``name -> (forward(), generate(n))`` for the base and each (system, distinct adapters)."""
    hf = dict(attention_mask=mask, do_sample=False, pad_token_id=0)

    def lorakit_calls(names):
        def forward():
            return lorakit_model(ids, attention_mask=mask, adapter_per_row=names)

        def generate(n):
            with lorakit.mixed_batch(lorakit_model, names):
                return lorakit_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **hf)
        return forward, generate

    def peft_calls(names):
        return (lambda: peft(input_ids=ids, attention_mask=mask, adapter_names=names),
                lambda n: peft.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, adapter_names=names,
                                        **hf))

    def base_calls():
        def forward():
            with lorakit.disabled(lorakit_model):
                return lorakit_model(ids, attention_mask=mask)

        def generate(n):
            with lorakit.disabled(lorakit_model):
                return lorakit_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **hf)
        return forward, generate

    calls = {"base": base_calls()}
    for distinct in DISTINCT:
        calls[f"lorakit_{distinct}"] = lorakit_calls(rows_for(distinct))
        calls[f"peft_{distinct}"] = peft_calls(rows_for(distinct))
    return calls


def measure(calls: dict, repeats: int, new_tokens: int) -> dict[str, dict[str, float]]:
    times = {name: {"forward": [], "generate_1": [], "generate_n": []} for name in calls}
    with torch.no_grad():
        for forward, generate in calls.values():  # warm-up
            forward()
            generate(1)
        for repeat in range(repeats):
            for name, (forward, generate) in calls.items():
                for key, fn in (("forward", forward), ("generate_1", lambda: generate(1)),
                                ("generate_n", lambda: generate(1 + new_tokens))):
                    seconds = timed(fn)
                    times[name][key].append(seconds)
                    emit({"measurement": key, "system": name, "repeat": repeat, "seconds": round(seconds, 4)})
    results = {}
    for name, series in times.items():
        forward = statistics.median(series["forward"])
        per_token = (statistics.median(series["generate_n"]) - statistics.median(series["generate_1"])) / new_tokens
        results[name] = {"forward_s": forward, "per_token_s": per_token}
    return results


def check_rows(lorakit_model, peft, ids, mask) -> float:
    """The largest logit difference between lorakit's and PEFT's mixed batch over 32 distinct adapters."""
    names = rows_for(32)
    with torch.no_grad():
        ours = lorakit_model(ids, attention_mask=mask, adapter_per_row=names).logits
        theirs = peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    return float((ours - theirs).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = lorakit.load_model()
    model.eval()
    with tempfile.TemporaryDirectory() as root:
        paths = random_adapters(model, Path(root))
        peft = peft_model(paths)
    ids = torch.randint(100, 20000, (ROWS, args.tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    emit({"measurement": "check", "max_abs_logit_difference_lorakit_vs_peft": check_rows(model, peft, ids, mask)})
    results = measure(systems(model, peft, ids, mask, args.new_tokens), args.repeats, args.new_tokens)
    base = results["base"]
    summary = {"threads": torch.get_num_threads(), "rows": ROWS, "tokens": args.tokens, "rank": RANK,
               "targets": list(TARGETS)}
    for name, result in results.items():
        system = name.split("_")[0]
        one = results.get(f"{system}_1", result)
        record = {"forward_vs_base": result["forward_s"] / base["forward_s"],
                  "per_token_vs_base": result["per_token_s"] / base["per_token_s"],
                  "forward_vs_one_adapter": result["forward_s"] / one["forward_s"],
                  "per_token_vs_one_adapter": result["per_token_s"] / one["per_token_s"], **result}
        summary[name] = {k: round(v, 4) for k, v in record.items()}
        emit({"measurement": "summary_row", "system": name, **summary[name]})
    emit({"measurement": "summary", **summary})


if __name__ == "__main__":
    main()
