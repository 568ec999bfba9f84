"""``lorakit serve`` under load: generated tokens/s and latency over many adapters, against the same server
serving the base model, a sequential transformers + PEFT ``generate`` loop, and PEFT's batched
``generate(adapter_names=...)``; and what a long prompt arriving does to the streams already decoding.

Default model (SmolLM2-135M-Instruct, fp32, CPU), 32 random non-zero adapters (r = 8, alpha = 16, targets
q_proj, v_proj, down_proj; timing needs no training). The server is the real one (``python -m lorakit
serve`` on a loopback port, ``--max-batch 32``), the clients the real ``openai`` package (``AsyncOpenAI``).
Each client sends ``--requests`` greedy completions one after the other; prompts are mixed lengths (8 to
96 tokens, a fixed random draw), ``max_tokens`` is ``--max-tokens`` with the end token ignored by choosing
prompts that rarely end early (the count of generated tokens is read from ``usage``, so an early end
is counted as what it is). Measured:

* ``load``: for 1, 8 and 32 concurrent clients over 1, 8 and 32 distinct adapters (client ``i`` asks for
  adapter ``i mod distinct``), and the same clients asking for the base model: tokens/s over the whole run,
  p50/p99 request latency; ``vs_base`` is the ratio to the base model under the same clients.
* ``paired_32x32``: ``--pairs`` more runs of 32 clients over 32 adapters, each right after a run of the same
  clients on the base; the median of those paired ratios is the number the 0.85x target is read from.
* ``peft_sequential``: the same 32 requests over 32 adapters, one ``generate`` at a time with
  ``set_adapter``, what a user without a server writes; ``peft_batched``: the same requests left-padded into
  one ``generate(adapter_names=...)`` batch, PEFT's best case, ``--pairs`` times; its median is compared
  with the median of lorakit's runs of 32 clients over 32 adapters (the grid's and the paired ones).
* ``transformers_serve``: the base model under the same clients through ``transformers serve`` (its
  continuous batching), where it runs here;
* ``long_prompt``: 16 streams decoding; the p99 (and p90, p50) gap between their tokens without and with a
  ``--long-prompt``-token prompt arriving (the scheduler's chunked prefill keeps the ratio small).

One JSON line per measurement, then a summary; results in ``docs/results/serving.md``.

    .venv/bin/python benchmarks/serve.py [--requests 2] [--max-tokens 32] [--pairs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from common import emit, random_adapter

RANK, ALPHA, TARGETS, ADAPTERS = 8, 16, ("q_proj", "v_proj", "down_proj"), 32
CLIENTS, DISTINCT = (1, 8, 32), (1, 8, 32)
READY = re.compile(r"lorakit serve: ready at (http://\S+)/v1")


def save_adapters(root: Path) -> list[Path]:
    model, _ = lorakit.load_model()
    generator = torch.Generator().manual_seed(0)
    config = lorakit.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    return [random_adapter(model, config, f"a{i}", root, generator) for i in range(ADAPTERS)]


def prompts(tokenizer, count: int) -> list[str]:
    """``count`` prompts of 8 to 96 tokens: words drawn from a fixed generator, detokenised."""
    generator = torch.Generator().manual_seed(1)
    texts = []
    for _ in range(count):
        length = int(torch.randint(8, 97, (1,), generator=generator))
        ids = torch.randint(1000, 20000, (length,), generator=generator).tolist()
        texts.append("Continue this text: " + tokenizer.decode(ids))
    return texts


@contextlib.contextmanager
def server(paths: list[Path], workdir: Path):
    """``lorakit serve`` with every adapter resident, until the block ends."""
    command = [sys.executable, "-m", "lorakit", "serve", "--port", "0", "--max-batch", "32",
               "--max-resident-adapters", str(max(1, len(paths)))]
    for index, path in enumerate(paths):
        command += ["--adapter", f"a{index}={path}"]
    out = workdir / "server.out"
    with out.open("wb") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (found := READY.search(out.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {out.read_text()}")
            time.sleep(0.2)
        yield found.group(1) + "/v1"
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextlib.contextmanager
def transformers_server(workdir: Path):
    """``transformers serve`` with the default model preloaded (continuous batching), until the block ends;
    yields ``(url, model name)`` or raises RuntimeError saying why it did not start."""
    import socket
    import urllib.request

    from lorakit.models import smollm2
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = str(smollm2.ensure_cached())
    command = [str(Path(sys.executable).parent / "transformers"), "serve", model, "--host", "127.0.0.1", "--port",
               str(port), "--continuous-batching", "--device", "cpu", "--dtype", "float32"]
    log = workdir / "transformers.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        process.terminate()
        process.wait(timeout=60)


async def run_load(url: str, models: list[str], texts: list[str], requests: int, max_tokens: int) -> dict:
    """Client ``i`` sends ``requests`` completions for ``models[i]``, one after the other."""
    import openai
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    latencies, tokens = [], 0

    async def one_client(index: int) -> None:
        nonlocal tokens
        for turn in range(requests):
            started = time.perf_counter()
            answer = await client.completions.create(model=models[index], prompt=texts[(index + turn) % len(texts)],
                                                     max_tokens=max_tokens, temperature=0)
            latencies.append(time.perf_counter() - started)
            tokens += answer.usage.completion_tokens
    started = time.perf_counter()
    await asyncio.gather(*[one_client(i) for i in range(len(models))])
    seconds = time.perf_counter() - started
    await client.close()
    ordered = sorted(latencies)
    return {"tokens_per_s": tokens / seconds, "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "tokens": tokens}


async def stream_gaps(url: str, texts: list[str], streams: int, max_tokens: int,
                      long_prompt: str | None) -> list[float]:
    """The gaps between streamed tokens of ``streams`` concurrent streams; with ``long_prompt`` sent once
    they all decode."""
    import openai
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    gaps: list[float] = []
    decoding = asyncio.Event()

    async def stream(index: int) -> None:
        last = None
        response = await client.completions.create(model=f"a{index}", prompt=texts[index], max_tokens=max_tokens,
                                                   temperature=0, stream=True)
        async for _ in response:
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
                if len(gaps) > 4 * streams:
                    decoding.set()
            last = now

    async def intruder() -> None:
        await decoding.wait()
        await client.completions.create(model="a0", prompt=long_prompt, max_tokens=1, temperature=0)
    jobs = [stream(i) for i in range(streams)] + ([intruder()] if long_prompt else [])
    await asyncio.gather(*jobs)
    await client.close()
    return gaps


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p99(values: list[float]) -> float:
    return quantile(values, 0.99)


def peft_loops(paths: list[Path], texts: list[str], max_tokens: int, repeats: int) -> dict:
    """PEFT: the 32 requests one ``generate`` at a time, and as one ``adapter_names`` batch (``repeats`` times,
    the median reported: its best case, measured as often as lorakit's)."""
    import peft
    base, tokenizer = lorakit.load_model()
    model = peft.PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
    for index, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{index}")
    model.eval()
    hf = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        started, tokens = time.perf_counter(), 0
        for index, text in enumerate(texts):
            model.set_adapter(f"a{index}")
            ids = tokenizer(text, return_tensors="pt")
            out = model.generate(**ids, **hf)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
        sequential = tokens / (time.perf_counter() - started)
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        batched = []
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(**batch, adapter_names=[f"a{i}" for i in range(len(texts))], **hf)
            generated = out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1])
            batched.append(generated / (time.perf_counter() - started))
    return {"peft_sequential_tokens_per_s": sequential, "peft_batched_tokens_per_s": statistics.median(batched),
            "peft_batched_runs_tokens_per_s": batched}


def paired_ratios(url: str, texts: list[str], args) -> dict:
    """32 clients over 32 adapters against 32 clients on the base, ``--pairs`` times, each run right after its
    base run: the median of the paired ratios (one run of 64 requests moves by about 10% from run to run)."""
    ratios, throughputs = [], []
    for pair in range(args.pairs):
        base = asyncio.run(run_load(url, ["smollm2-135m"] * 32, texts, args.requests, args.max_tokens))
        ours = asyncio.run(run_load(url, [f"a{i}" for i in range(32)], texts, args.requests, args.max_tokens))
        ratios.append(ours["tokens_per_s"] / base["tokens_per_s"])
        throughputs.append(ours["tokens_per_s"])
        emit({"measurement": "paired_32x32", "pair": pair, "base_tokens_per_s": base["tokens_per_s"],
              "tokens_per_s": ours["tokens_per_s"], "ratio": ratios[-1]})
    return {"ratios": ratios, "median": statistics.median(ratios), "tokens_per_s": throughputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=1500, help="tokens of the prompt arriving mid-stream")
    parser.add_argument("--pairs", type=int, default=5,
                        help="paired runs of 32 clients over 32 adapters against the base (median ratio reported)")
    args = parser.parse_args()
    _, tokenizer = lorakit.load_model()
    texts = prompts(tokenizer, ADAPTERS)
    summary: dict = {"threads": torch.get_num_threads(), "rank": RANK, "targets": list(TARGETS),
                     "requests_per_client": args.requests, "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as root:
        paths = save_adapters(Path(root))
        with server(paths, Path(root)) as url:
            for clients in CLIENTS:
                base = asyncio.run(run_load(url, ["smollm2-135m"] * clients, texts, args.requests, args.max_tokens))
                emit({"measurement": "load", "clients": clients, "model": "base", **base})
                summary[f"base_{clients}"] = base
                for distinct in DISTINCT:
                    models = [f"a{i % distinct}" for i in range(clients)]
                    result = asyncio.run(run_load(url, models, texts, args.requests, args.max_tokens))
                    result["vs_base"] = result["tokens_per_s"] / base["tokens_per_s"]
                    emit({"measurement": "load", "clients": clients, "distinct": distinct, **result})
                    summary[f"clients_{clients}_adapters_{distinct}"] = result
            summary["paired_32x32_vs_base"] = paired_ratios(url, texts, args)
            long_prompt = tokenizer.decode(torch.randint(1000, 20000, (args.long_prompt,),
                                                         generator=torch.Generator().manual_seed(2)).tolist())
            alone = asyncio.run(stream_gaps(url, texts, 16, args.max_tokens * 2, None))
            intruded = asyncio.run(stream_gaps(url, texts, 16, args.max_tokens * 2, long_prompt))
            summary["long_prompt"] = {"p99_gap_s": p99(alone), "p99_gap_with_long_prompt_s": p99(intruded),
                                      "ratio": p99(intruded) / p99(alone),
                                      "p90_gap_s": quantile(alone, 0.9), "p90_gap_with_long_prompt_s":
                                      quantile(intruded, 0.9), "p50_gap_s": quantile(alone, 0.5),
                                      "p50_gap_with_long_prompt_s": quantile(intruded, 0.5)}
            emit({"measurement": "long_prompt", **summary["long_prompt"]})
        try:
            with transformers_server(Path(root)) as (url, name):
                for clients in CLIENTS:
                    result = asyncio.run(run_load(url, [name] * clients, texts, args.requests, args.max_tokens))
                    result["lorakit_base_vs_this"] = summary[f"base_{clients}"]["tokens_per_s"] / result["tokens_per_s"]
                    emit({"measurement": "transformers_serve", "clients": clients, **result})
                    summary[f"transformers_serve_{clients}"] = result
        except Exception as error:  # noqa: BLE001 - that it does not run here is a result too
            summary["transformers_serve"] = f"did not run: {error}"
            emit({"measurement": "transformers_serve", "error": str(error)[-500:]})
        peft_numbers = peft_loops(paths, texts, args.max_tokens, args.pairs)
    ours = statistics.median([summary["clients_32_adapters_32"]["tokens_per_s"],
                              *summary["paired_32x32_vs_base"]["tokens_per_s"]])
    summary["clients_32_adapters_32_median_tokens_per_s"] = ours
    summary.update(peft_numbers)
    summary["clients_32_adapters_32_vs_peft_batched"] = ours / peft_numbers["peft_batched_tokens_per_s"]
    summary["clients_32_adapters_32_vs_peft_sequential"] = ours / peft_numbers["peft_sequential_tokens_per_s"]
    emit({"measurement": "summary", **summary})


if __name__ == "__main__":
    main()
