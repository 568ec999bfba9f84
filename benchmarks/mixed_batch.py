"""Mixed batches: one adapter per row, lorakit's stacked path against PEFT's ``adapter_names``, same run.

Default model (SmolLM2-135M-Instruct, fp32, CPU), 32 random non-zero adapters (r = 8, alpha = 16,
targets ``--targets``, default q_proj, k_proj, v_proj; timing needs no training), a batch of 32 rows
of ``--tokens`` tokens. The rows are spread round-robin over ``--distinct`` (1, 4, 16, 32) adapters.
Measured ``--repeats`` times, round-robin over the systems, under ``torch.no_grad``:

* ``forward``: one full forward of the batch (prefill);
* ``per_token``: one decode step, one new token for each of the 32 rows on a KV cache holding the
  batch (the cache is cut back after each step, so every step sees the same length), timed directly
  (``--steps`` pairs per repeat): the difference of two ``generate`` timings it once was is mostly noise.

``lorakitfrozen`` is lorakit's mixed batch inside ``lorakit.frozen_factors()``, as the server runs it: the
stacked factors are then not checked against every adapter parameter at every layer.

The base is the plain model: a second copy of the same weights loaded without lorakit's wrappers or
PEFT's, not a wrapped model with its adapters disabled. Each measurement of a system is paired with
one of the base right before it, and ``*_vs_base`` is the median of the paired ratios (at least 5 for
a reported number): this shared machine's load drifts by tens of percent within minutes, and a pair
shares it. ``*_vs_one_adapter`` divides a system's ratio by that of the same
library with one adapter for every row. Prints one JSON line per measurement and a final summary
line; results in ``docs/results/mixed_batch.md``.

    .venv/bin/python benchmarks/mixed_batch.py [--repeats 5] [--tokens 64] [--steps 10] \
        [--targets q_proj,v_proj,down_proj] [--distinct 1,32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache

import lorakit
from common import emit, random_adapter, timed

RANK, ALPHA, TARGETS, ROWS, ADAPTERS = 8, 16, ("q_proj", "k_proj", "v_proj"), 32, 32
DISTINCT = (1, 4, 16, 32)


def random_adapters(model, root: Path, targets: tuple[str, ...]) -> list[Path]:
    """Attach 32 random non-zero adapters to ``model`` and save each (PEFT loads the same files)."""
    generator = torch.Generator().manual_seed(0)
    config = lorakit.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)
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


def systems(plain, lorakit_model, peft, ids, mask, distinct_counts: tuple[int, ...]) -> dict:
    """``name -> (forward(), step())`` for the plain base model and each (system, distinct adapters): a full
    forward of the batch, and one decode step on a KV cache of the batch (cut back after each step)."""
    def calls(model, keywords):
        cache = DynamicCache(config=plain.config)
        next_ids = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, **keywords).logits[:, -1:]
        next_ids = next_ids.argmax(-1)
        step_mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=mask.dtype)

        def step():
            model(input_ids=next_ids, attention_mask=step_mask, cache=cache, use_cache=True, **keywords)
            cache.crop(-1)
        return (lambda: model(input_ids=ids, attention_mask=mask, **keywords)), step

    with torch.no_grad():
        result = {"base": calls(plain, {})}
        for distinct in distinct_counts:
            result[f"lorakit_{distinct}"] = calls(lorakit_model, {"adapter_per_row": rows_for(distinct)})
            result[f"lorakitfrozen_{distinct}"] = tuple(map(frozen, result[f"lorakit_{distinct}"]))
            result[f"peft_{distinct}"] = calls(peft, {"adapter_names": rows_for(distinct)})
    return result


def frozen(call):
    """``call`` inside ``lorakit.frozen_factors()``: its stacks are not checked against every parameter."""
    def run():
        with lorakit.frozen_factors():
            return call()
    return run


def measure(calls: dict, repeats: int, steps: int) -> dict[str, dict[str, float]]:
    """Each system's forward (``repeats`` times) and decode step (``steps`` times a repeat), each timed right
    after the same call of the base model; the medians of the times and of the paired ratios."""
    times = {name: {"forward": [], "per_token": []} for name in calls}
    ratios = {name: {"forward": [], "per_token": []} for name in calls}

    def pair(name: str, key: str, fn, base_fn, repeat: int) -> None:
        base, seconds = timed(base_fn), timed(fn)
        times[name][key].append(seconds)
        ratios[name][key].append(seconds / base)
        emit({"measurement": key, "system": name, "repeat": repeat, "seconds": round(seconds, 4),
              "base_seconds": round(base, 4)})

    base_forward, base_step = calls["base"]
    with torch.no_grad():
        for forward, step in calls.values():  # warm-up
            forward()
            step()
        for repeat in range(repeats):
            for name, (forward, step) in calls.items():
                pair(name, "forward", forward, base_forward, repeat)
                for _ in range(steps):
                    pair(name, "per_token", step, base_step, repeat)
    return {name: {"forward_s": statistics.median(series["forward"]),
                   "per_token_s": statistics.median(series["per_token"]),
                   "forward_vs_base": statistics.median(ratios[name]["forward"]),
                   "per_token_vs_base": statistics.median(ratios[name]["per_token"])}
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
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed per repeat")
    parser.add_argument("--targets", default=",".join(TARGETS), help="adapted modules, comma-separated")
    parser.add_argument("--distinct", default=",".join(map(str, DISTINCT)),
                        help="distinct adapters over the 32 rows, comma-separated counts")
    args = parser.parse_args()
    targets = tuple(args.targets.split(","))
    distinct_counts = tuple(int(n) for n in args.distinct.split(","))
    torch.manual_seed(0)
    model, _ = lorakit.load_model()
    plain, _ = lorakit.load_model()  # the base: the same weights, never wrapped
    with tempfile.TemporaryDirectory() as root:
        paths = random_adapters(model, Path(root), targets)
        peft = peft_model(paths)
    ids = torch.randint(100, 20000, (ROWS, args.tokens), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    emit({"measurement": "check", "max_abs_logit_difference_lorakit_vs_peft": check_rows(model, peft, ids, mask),
          "max_abs_logit_difference_disabled_vs_plain_base": check_base(model, plain, ids, mask)})
    results = measure(systems(plain, model, peft, ids, mask, distinct_counts), args.repeats, args.steps)
    summary = {"threads": torch.get_num_threads(), "rows": ROWS, "tokens": args.tokens, "rank": RANK,
               "targets": list(targets), "forward_pairs": args.repeats, "step_pairs": args.repeats * args.steps}
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
