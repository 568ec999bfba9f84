"""Does long-context training work: ``task:recall`` (a passcode stated ~2,000 tokens before the question) trained
whole with SeCO, against whole-sequence training truncated to what fits the same activation budget.

Both runs: the default model, LoRA r = 8, alpha = 16 on q_proj and v_proj, ``--steps`` steps of one example, the same
learning rate. ``seco``: ``lorakit train --data task:recall --max-length 2304 --chunk-size 256``. ``truncated``: the
same examples with each prompt cut from the left to ``--truncate`` tokens in all (what whole sequences train within
the budget, docs/results/long_context.md), so that the question and the answer stay and the passcode's line goes,
as a user whose sequences do not fit would cut them. Each adapter and the base are scored by exact match on
``--n`` test prompts at full length (``lorakit eval``); the runs' peak memory is ``lorakit train``'s. Results go to
``docs/results/long_context_recall.json``.

    .venv/bin/python benchmarks/long_context_recall.py [--steps 60] [--truncate 1152] [--n 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import emit

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results" / "long_context_recall.json"
TRAIN_FLAGS = ["--rank", "8", "--alpha", "16", "--targets", "q_proj,v_proj", "--batch-size", "1", "--quiet"]


def _lorakit(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def truncated_examples(path: Path, n: int, tokens: int) -> None:
    """The first ``n`` training examples of ``task:recall`` with each prompt cut from the left until the encoded
    example holds at most ``tokens`` tokens, written to ``path``."""
    from lorakit.data.encoding import encode
    from lorakit.data.jsonl import save_jsonl
    from lorakit.data.source import load_examples
    from lorakit.models.load import load_tokenizer, resolve_source
    tokenizer = load_tokenizer(resolve_source("smollm2-135m"), "smollm2-135m")
    cut = []
    for example in load_examples("task:recall", split="train", n=n):
        low, high = 0, len(example.prompt)  # the fewest characters dropped that fit
        while low < high:
            middle = (low + high) // 2
            trial = example.__class__(prompt=example.prompt[middle:], completion=example.completion)
            if len(encode(trial, tokenizer, chat=None, max_length=None).input_ids) <= tokens:
                high = middle
            else:
                low = middle + 1
        cut.append(example.__class__(prompt=example.prompt[low:], completion=example.completion))
    save_jsonl(path, cut)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--truncate", type=int, default=1152)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--lr", default="1e-3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        truncated_examples(root / "truncated.jsonl", args.steps, args.truncate)
        common = [*TRAIN_FLAGS, "--steps", str(args.steps), "--lr", args.lr, "--n", str(args.steps)]
        runs = {
            "seco": _lorakit("train", "--data", "task:recall", "--out", str(root / "seco"), "--max-length", "2304",
                             "--chunk-size", "256", *common),
            "truncated": _lorakit("train", "--data", str(root / "truncated.jsonl"), "--out", str(root / "truncated"),
                                  "--max-length", str(args.truncate), *common),
        }
        scores = {"base": _lorakit("eval", "--data", "task:recall", "--n", str(args.n), "--json")}
        for name in runs:
            scores[name] = _lorakit("eval", "--data", "task:recall", "--adapter", str(root / name), "--n",
                                    str(args.n), "--json")
    record = {"steps": args.steps, "lr": args.lr, "truncate": args.truncate, "n": args.n,
              "train": runs, "exact_match": {name: score.get("exact_match") for name, score in scores.items()}}
    emit(record)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
