"""Mixed batches: one adapter per row, lorakit's stacked path against PEFT's ``adapter_names``, same run.

Default model (SmolLM2-135M-Instruct, fp32, CPU), 32 random non-zero adapters (r = 8, alpha = 16,
targets q_proj, k_proj, v_proj; timing needs no training), a batch of 32 rows of ``--tokens`` tokens.
The rows are spread round-robin over 1, 4, 16 and 32 distinct adapters. Measured ``--repeats``
times, round-robin over the systems, under ``torch.no_grad``:

* ``forward``: one full forward of the batch (prefill);
* ``per_token``: one more greedy token for all 32 rows with the KV cache,
  ``(t(generate 1 + --new-tokens) - t(generate 1)) / --new-tokens``.

The base is the plain model: a second copy of the same weights loaded without lorakit's wrappers or
PEFT's, not a wrapped model with its adapters disabled. Each measurement of a system is paired with
one of the base right before it, and ``*_vs_base`` is the median of the ``--repeats`` paired ratios
(at least 5 for a reported number): this shared machine's load drifts by tens of percent within
minutes, and a pair shares it. ``*_vs_one_adapter`` divides a system's ratio by that of the same
library with one adapter for every row. Prints one JSON line per measurement and a final summary
line; results in ``docs/results/mixed_batch.md``.

    .venv/bin/python benchmarks/mixed_batch.py [--repeats 5] [--tokens 64] [--new-tokens 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from functools import partial
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


def systems(plain, lorakit_model, peft, ids, mask) -> dict:
    """``name -> (forward(), generate(n))`` for the plain base model and each (system, distinct adapters)."""
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

    calls = {"base": (lambda: plain(ids, attention_mask=mask),
                      lambda n: plain.generate(ids, max_new_tokens=n, min_new_tokens=n, **hf))}
    for distinct in DISTINCT:
        calls[f"lorakit_{distinct}"] = lorakit_calls(rows_for(distinct))
        calls[f"peft_{distinct}"] = peft_calls(rows_for(distinct))
    return calls


def measure(calls: dict, repeats: int, new_tokens: int) -> dict[str, dict[str, float]]:
    """Each system's forward, ``generate(1)`` and ``generate(1 + new_tokens)`` timed right after the same
    call of the base model, ``repeats`` times; the medians of the times and of the paired ratios."""
    lengths = {"generate_1": 1, "generate_n": 1 + new_tokens}
    times = {name: {key: [] for key in ("forward", *lengths)} for name in calls}
    base_times = {name: {key: [] for key in ("forward", *lengths)} for name in calls}

    def pair(name: str, key: str, fn, base_fn, repeat: int) -> None:
        base, seconds = timed(base_fn), timed(fn)
        times[name][key].append(seconds)
        base_times[name][key].append(base)
        emit({"measurement": key, "system": name, "repeat": repeat, "seconds": round(seconds, 4),
              "base_seconds": round(base, 4)})

    base_forward, base_generate = calls["base"]
    with torch.no_grad():
        for forward, generate in calls.values():  # warm-up
            forward()
            generate(1)
        for repeat in range(repeats):
            for name, (forward, generate) in calls.items():
                pair(name, "forward", forward, base_forward, repeat)
                for key, n in lengths.items():
                    pair(name, key, partial(generate, n), partial(base_generate, n), repeat)

    def per_token(series: dict[str, list[float]]) -> list[float]:
        return [(n - one) / new_tokens for one, n in zip(series["generate_1"], series["generate_n"], strict=True)]

    def paired(ours: list[float], base: list[float]) -> float:
        return statistics.median(o / b for o, b in zip(ours, base, strict=True))

    return {name: {"forward_s": statistics.median(series["forward"]),
                   "per_token_s": statistics.median(per_token(series)),
                   "forward_vs_base": paired(series["forward"], base_times[name]["forward"]),
                   "per_token_vs_base": paired(per_token(series), per_token(base_times[name]))}
            for name, series in times.items()}


def check_rows(lorakit_model, peft, ids, mask) -> float:
    """The largest logit difference between lorakit's and PEFT's mixed batch over 32 distinct adapters."""
    names = rows_for(32)
    with torch.no_grad():
        ours = lorakit_model(ids, attention_mask=mask, adapter_per_row=names).logits
        theirs = peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    return float((ours - theirs).abs().max())


def check_base(lorakit_model, plain, ids, mask) -> float:
    """The largest logit difference between the plain base model and lorakit's with its adapters disabled
    (zero: the base the ratios divide by is the same model, only unwrapped)."""
    with torch.no_grad(), lorakit.disabled(lorakit_model):
        return float((lorakit_model(ids, attention_mask=mask).logits - plain(ids, attention_mask=mask).logits)
                     .abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5,
                        help="paired measurements per system (the medians reported need at least 5)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per row of the batch")
    parser.add_argument("--new-tokens", type=int, default=4, help="greedy tokens timed per row for per_token")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = lorakit.load_model()
    plain, _ = lorakit.load_model()  # the base: the same weights, never wrapped
    with tempfile.TemporaryDirectory() as root:
        paths = random_adapters(model, Path(root))
        peft = peft_model(paths)
    ids = torch.randint(100, 20000, (ROWS, args.tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    emit({"measurement": "check", "max_abs_logit_difference_lorakit_vs_peft": check_rows(model, peft, ids, mask),
          "max_abs_logit_difference_disabled_vs_plain_base": check_base(model, plain, ids, mask)})
    results = measure(systems(plain, model, peft, ids, mask), args.repeats, args.new_tokens)
    summary = {"threads": torch.get_num_threads(), "rows": ROWS, "tokens": args.tokens, "rank": RANK,
               "targets": list(TARGETS), "pairs": args.repeats}
    for name, result in results.items():
        system = name.split("_")[0]
        one = results.get(f"{system}_1", result)
        record = {"forward_vs_base": result["forward_vs_base"], "per_token_vs_base": result["per_token_vs_base"],
                  "forward_vs_one_adapter": result["forward_vs_base"] / one["forward_vs_base"],
                  "per_token_vs_one_adapter": result["per_token_vs_base"] / one["per_token_vs_base"],
                  "forward_s": result["forward_s"], "per_token_s": result["per_token_s"]}
        summary[name] = {k: round(v, 4) for k, v in record.items()}
        emit({"measurement": "summary_row", "system": name, **summary[name]})
    emit({"measurement": "summary", **summary})


if __name__ == "__main__":
    main()
