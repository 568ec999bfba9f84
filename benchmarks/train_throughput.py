"""LoRA training throughput and peak memory: lorakit vs peft on the default model, same run.

Same configuration for both (all-linear, r = 16, alpha = 32, dropout 0, batch 8 x length 128, AdamW,
fp32 on the CPU; each can be changed, see ``--help``); each library computes its loss its own way:
peft through the model's ``labels`` loss (full logits), lorakit through its trainer's loss
(:func:`lorakit.models.supervised_loss.supervised_outputs`, the head fused with the cross-entropy) with freed
memory kept for reuse as lorakit's trainer does (``--allocator reuse-both`` gives peft the same). Data:
``--data random`` is random tokens, every one supervised; ``--data sft`` is chat-formatted examples of
the built-in ``date`` task with their prompts masked (-100), as in instruction tuning.
Each child also times the machine's fp32 matmul throughput and reports the fraction of it the run
reaches: tokens/s x training FLOPs per token (:func:`training_flops_per_token`) / matmul FLOP/s.
Each measurement runs in its own subprocess so that peak memory (max RSS) is that library's alone;
runs alternate between the libraries and the ratios are medians over back-to-back pairs, because this
shared machine's speed drifts by tens of percent within minutes. Prints one JSON line per
measurement and a final line with the ratios.

    .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--repeats 2] [--data random|sft] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

LIBRARIES = ("peft", "lorakit")


@dataclass(frozen=True)
class Setting:
    """One training configuration; ``adapters`` counts every attached adapter, one of them trained."""

    data: str = "random"
    batch: int = 8
    length: int = 128
    rank: int = 16
    dropout: float = 0.0
    adapters: int = 1
    compile: bool = False
    """Both libraries' model body under ``torch.compile`` (:func:`lorakit.train.compiled.compiled_body`);
    the warm-up steps include the compilation."""
    allocator: str = "as-shipped"
    """``as-shipped``: lorakit keeps freed memory as its trainer does (:mod:`lorakit.train.allocator`),
    peft runs with glibc's defaults; ``reuse-both``: both keep it (how much of the gap is the allocator)."""

    def arguments(self) -> list[str]:
        return [f"--{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self)]


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(Setting):
        kind = type(field.default)
        parser.add_argument(f"--{field.name}", type=(lambda text: text == "True") if kind is bool else kind,
                            default=field.default)


def setting_of(args: argparse.Namespace) -> Setting:
    return Setting(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Setting)})


def batch_of(setting: Setting, tokenizer) -> dict:
    """The benchmark's one batch: ``input_ids``, ``attention_mask`` and ``labels``."""
    import torch

    if setting.data == "random":
        ids = torch.randint(0, 49152, (setting.batch, setting.length), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    from lorakit.data.batching import collate
    from lorakit.data.encoding import encode, pad_id
    from lorakit.data.tasks import get_task
    examples = get_task("date").examples("train", setting.batch)
    encoded = [encode(e, tokenizer, chat=True, max_length=setting.length) for e in examples]
    return collate(encoded, pad_id=pad_id(tokenizer))


def matmul_flops_per_s(seconds: float = 3.0) -> float:
    """The machine's fp32 matmul throughput (FLOP/s) on a (1024 x 576) @ (576 x 1536) product, the shape
    of the model's FFN projections at batch 8 x 128: the best of three timings of ``seconds / 3``."""
    import torch

    a, b = torch.randn(1024, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            a @ b
            count += 1
        best = max(best, count * 2 * 1024 * 576 * 1536 / (time.perf_counter() - started))
    return best


def training_flops_per_token(model, length: int) -> float:
    """``4 x`` the parameters of every linear layer (forward + input gradients, the output head included),
    plus attention's ``QKᵀ`` and ``AV`` (forward + backward: ``8 x layers x length x hidden``)."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    return 4 * linear + 8 * config.num_hidden_layers * length * config.hidden_size


def adapted(library: str, model, setting: Setting):
    """``model`` with ``setting.adapters`` adapters attached the library's way, the first one trained;
    returns the model to call and its trainable parameters."""
    if library == "lorakit":
        import lorakit
        config = lorakit.LoraConfig(rank=setting.rank, alpha=2 * setting.rank, targets="all-linear",
                                    dropout=setting.dropout)
        for index in range(setting.adapters):
            lorakit.attach(model, config, f"a{index}", activate=index == 0, trainable=index == 0)
        return model, list(lorakit.trainable_parameters(model).values())
    import peft
    config = peft.LoraConfig(r=setting.rank, lora_alpha=2 * setting.rank, target_modules="all-linear",
                             lora_dropout=setting.dropout)
    model = peft.get_peft_model(model, config, adapter_name="a0")
    for index in range(1, setting.adapters):
        model.add_adapter(f"a{index}", config)
    model.set_adapter("a0")
    return model, [p for p in model.parameters() if p.requires_grad]


def measure(library: str, steps: int, setting: Setting) -> dict:
    """Train ``steps`` steps (after 2 warm-up steps) with ``library``; tokens/s and peak RSS. Freed memory is
    kept for reuse as lorakit's trainer keeps it (``lorakit train``'s default) for lorakit, and for peft too
    with ``--allocator reuse-both``."""
    from lorakit.train.allocator import freed_memory_kept

    with freed_memory_kept(library == "lorakit" or setting.allocator == "reuse-both"):
        return _measure(library, steps, setting)


def _measure(library: str, steps: int, setting: Setting) -> dict:
    import torch

    from lorakit.models import load_model

    model, tokenizer = load_model()
    batch = batch_of(setting, tokenizer)
    flops_per_token = training_flops_per_token(model, int(batch["attention_mask"].sum(dim=1).float().mean()))
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, parameters = adapted(library, model, setting)
    model.train()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def loss_of() -> torch.Tensor:
        if library == "peft":
            return model(**batch).loss
        from lorakit.models.supervised_loss import logits_loss, supervised_outputs, supervised_tokens
        return logits_loss(supervised_outputs(model, batch)) / supervised_tokens(batch)

    def step() -> None:
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    from lorakit.train.compiled import compiled_body
    with compiled_body(model if library == "lorakit" else model.get_base_model(), setting.compile):
        for _ in range(2):
            step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens_per_s = steps * int(batch["attention_mask"].sum()) / seconds
    peak = matmul_flops_per_s()
    return {"library": library, **dataclasses.asdict(setting), "tokens_per_s": tokens_per_s,
            "fraction_of_matmul_peak": tokens_per_s * flops_per_token / peak, "matmul_gflops": peak / 1e9,
            "seconds_per_step": seconds / steps, "peak_rss_mib": peak_kib / 1024,
            "training_rss_mib": (peak_kib - baseline_kib) / 1024,
            "trainable_parameters": sum(p.numel() for p in parameters), "threads": torch.get_num_threads()}


def run_child(library: str, steps: int, setting: Setting) -> dict:
    """:func:`measure` in a fresh process (its peak memory is that run's alone)."""
    out = subprocess.run([sys.executable, __file__, "--child", library, "--steps", str(steps), *setting.arguments()],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(steps: int, repeats: int, setting: Setting) -> dict:
    """Alternate the libraries ``repeats`` times; medians, and the medians of the lorakit/peft ratios of
    back-to-back pairs (a pair shares the shared machine's momentary load)."""
    results: dict[str, list[dict]] = {library: [] for library in LIBRARIES}
    for _ in range(repeats):
        for library in LIBRARIES:
            results[library].append(run_child(library, steps, setting))
            print(json.dumps(results[library][-1]), flush=True)
    summary = {"summary": "train_throughput", **dataclasses.asdict(setting)}
    for key in ("tokens_per_s", "peak_rss_mib", "fraction_of_matmul_peak"):
        for library, records in results.items():
            summary[f"{library}_{key}"] = statistics.median(r[key] for r in records)
    pairs = list(zip(results["peft"], results["lorakit"], strict=True))
    for key, name in (("tokens_per_s", "speed"), ("peak_rss_mib", "memory")):
        summary[f"{name}_ratio_lorakit_over_peft"] = statistics.median(o[key] / p[key] for p, o in pairs)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    add_setting_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, setting_of(args))))
        return
    print(json.dumps(compare(args.steps, args.repeats, setting_of(args))))


if __name__ == "__main__":
    main()
