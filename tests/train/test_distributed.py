"""Data-parallel training under real ``torchrun`` processes on gloo: N ranks train the adapter one process trains
with the same global batch; only rank 0 writes; a killed rank stops the run and the last checkpoint resumes it;
two "nodes" on loopback; ``lorakit train --nproc``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli.main import main
from lorakit.cli.torchrun_launch import torchrun_command, without_flag
from lorakit.data.jsonl import save_jsonl
from lorakit.train.checkpoint import list_checkpoints
from tests.helpers import copy_examples, perturb, read_tensors
from tests.helpers.torchrun import free_port, standalone, torchrun

ADAPTER = "adapter_model.safetensors"
# Prompt-masked rows of 2-5 answer tokens: ranks see different token counts, so a per-rank mean would differ.
FLAGS = ["--rank", "4", "--alpha", "8", "--lr", "0.01", "--batch-size", "2", "--seed", "0", "--quiet",
         "--log-every", "1", "--max-grad-norm", "0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed-data")
    paths = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    save_jsonl(paths["train"], copy_examples(48))
    save_jsonl(paths["eval"], copy_examples(67, seed=1))  # 67: the ranks score 34 and 33 (the first 64 are read)
    return paths


LORAKIT = ("-m", "lorakit")


def _run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``command``; a failure shows its stderr without progress bars (a crash: every thread's Python stack)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines()
                                             if "Loading weights" not in line and line.strip())[-8000:]
    return result


def _train(base_dir: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data["train"]), "--out", str(out), "--base", str(base_dir), *FLAGS, *extra]


def _assert_same_adapter(found: Path, expected: Path, atol: float = 1e-5) -> None:
    found_tensors, expected_tensors = read_tensors(found / ADAPTER), read_tensors(expected / ADAPTER)
    assert found_tensors.keys() == expected_tensors.keys()
    for name, tensor in expected_tensors.items():
        torch.testing.assert_close(found_tensors[name], tensor, atol=atol, rtol=0, msg=name)


def _metrics(run: Path) -> list[dict]:
    """The steps' and evaluations' rows of a run's metrics."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row or "eval_loss" in row]


@pytest.fixture(scope="module")
def single(base_dir, data, tmp_path_factory) -> Path:
    """One process, 4 micro-batches of 2 per step (the global batch of 2 ranks x grad-accum 2)."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(_train(base_dir, data, out, "--steps", "6", "--grad-accum", "4", "--eval-data", str(data["eval"]),
                       "--eval-every", "3")) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(base_dir, data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("two-ranks") / "run"
    result = _run([*standalone(2), *LORAKIT, *_train(base_dir, data, out, "--steps", "6", "--grad-accum", "2",
                                            "--eval-data", str(data["eval"]), "--eval-every", "3")])
    return out, result


def test_two_ranks_train_the_adapter_one_process_trains_with_the_same_global_batch(single, two_ranks):
    out, result = two_ranks
    _assert_same_adapter(out, single)
    found, expected = _metrics(out), _metrics(single)
    assert [r["step"] for r in found] == [r["step"] for r in expected]
    for got, want in zip(found, expected, strict=True):
        for key in ("loss", "eval_loss"):  # losses over both ranks' tokens; evaluation sharded and combined
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-5), (key, got["step"])
    assert result.stdout.count('"trainable_parameters"') == 1  # only rank 0 prints the summary


def test_a_killed_rank_stops_the_run_and_its_last_checkpoint_resumes_on_two_ranks_or_one(base_dir, data, two_ranks,
                                                                                        tmp_path, capsys):
    out = tmp_path / "run"
    train = _train(base_dir, data, out, "--steps", "6", "--grad-accum", "2", "--save-every", "1",
                   "--keep-checkpoints", "10", "--eval-data", str(data["eval"]), "--eval-every", "1",
                   "--dist-timeout", "60")  # evaluating after every step gives the kill time to land
    command = [*standalone(2), *LORAKIT, *train]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out) and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.005)
        workers = _children(launcher.pid)
        assert len(workers) == 2 and launcher.poll() is None, "the run ended before a rank could be killed"
        os.kill(workers[-1], signal.SIGKILL)
        killed = time.monotonic()
        _, errors = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode != 0 and time.monotonic() - killed < 90, errors[-2000:]
    assert not (out / ADAPTER).exists()  # nothing half-trained is published
    kept = list_checkpoints(out)
    assert kept and all((c / name).is_file() for c in kept for name in ("state.json", "trainable.safetensors"))
    assert int(kept[-1].name.split("-")[1]) < 6
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)

    _run([*standalone(2), *LORAKIT, "train", "--resume", str(out), "--quiet"])
    _assert_same_adapter(out, two_ranks[0], atol=1e-6)  # the resumed run is the straight one

    assert main(["train", "--resume", str(copy), "--quiet"]) == 2  # one process, the global batch not kept
    assert "needs grad_accum=4 (resume with --grad-accum 4)" in capsys.readouterr().err
    assert main(["train", "--resume", str(copy), "--quiet", "--grad-accum", "4"]) == 0
    _assert_same_adapter(copy, two_ranks[0])


def test_two_nodes_on_loopback_train_the_single_process_adapter(base_dir, data, single, tmp_path):
    out, port = tmp_path / "run", free_port()
    train = _train(base_dir, data, out, "--steps", "6", "--grad-accum", "2", "--eval-data", str(data["eval"]),
                   "--eval-every", "3")
    nodes = [subprocess.Popen([*torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                                          "--master_addr", "127.0.0.1", "--master_port", str(port)), *LORAKIT, *train],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}) for rank in (0, 1)]
    for node in nodes:
        _, errors = node.communicate(timeout=240)
        assert node.returncode == 0, errors[-3000:]
    _assert_same_adapter(out, single)


def test_nproc_launches_torchrun_with_the_same_command(base_dir, data, tmp_path):
    single = tmp_path / "single"
    assert main(_train(base_dir, data, single, "--steps", "3", "--grad-accum", "2")) == 0
    out = tmp_path / "nproc"
    assert main(_train(base_dir, data, out, "--steps", "3", "--nproc", "2")) == 0
    _assert_same_adapter(out, single)


def test_the_launcher_command_drops_only_nproc():
    assert without_flag(["train", "--nproc", "2", "--steps", "3", "--nproc=4"], "--nproc") == ["train", "--steps",
                                                                                               "3"]
    assert torchrun_command(2, ["train", "--nproc", "2"])[-3:] == ["-m", "lorakit", "train"]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's ranks), in start order."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append((int(fields[19]), int(entry.name)))  # (start time, pid)
    return [child for _, child in sorted(found)]


METHODS = {
    "lora-ga": ["--init", "lora-ga"],              # each rank estimates from its share of the batches
    "eva": ["--init", "eva"],
    "loftq": ["--init", "loftq"],
    "lq-lora": ["--init", "lq-lora", "--bits", "3", "--quant-iterations", "2"],  # each rank sweeps its share
    "dylora": ["--method", "dylora"],              # one nested rank a step, drawn alike on every rank
    "codyra": ["--method", "codyra"],
    "mixlora": ["--method", "mixlora"],            # experts that get no token on a rank
    "l4q": ["--method", "l4q"],
    "lora-pro": ["--optimizer", "lora-pro"],
    "allora": ["--optimizer", "allora"],
    "ba-lora": ["--regularizer", "ba-lora"],
    "nf4": ["--quantize", "nf4"],
    "fsdp-lora-ga": ["--fsdp", "--init", "lora-ga"],  # inits computed before sharding (the one process: no --fsdp)
    "fsdp-eva": ["--fsdp", "--init", "eva"],
    "checkpointing": ["--gradient-checkpointing"],
    "fsdp-checkpointing": ["--fsdp", "--gradient-checkpointing"],  # blocks recomputed inside FSDP2's units
    "seco": ["--chunk-size", "5"],
    "spaco": ["--chunk-size", "5", "--sparse-chunks", "2"],  # each micro-batch's draw, on whichever rank it runs
    "loram": ["--loram-ratio", "0.5", "--loram-keep-first", "0", "--loram-keep-last", "0"],  # gradients summed first
    "pat": ["--method", "pat"],                    # the mask and modules all-reduced like the adapter; one model
}
LOOSER = {"fsdp-lora-ga": 1e-4}
"""FSDP takes the loss from the model's full logits, one process from lorakit's fused head loss: the same sum in
another order, which LoRA-GA's large first steps grow to 3e-5 on the tiny model (plain LoRA stays within 1e-5)."""


def _same_outputs(found: Path, expected: Path, atol: float = 1e-5) -> None:
    """Every tensor of every safetensors file a run wrote (checkpoints aside) agrees within ``atol``."""
    def files(root: Path) -> dict[str, Path]:  # MixLoRA's expert folder is named afresh by each save
        return {re.sub(r"mixlora-[0-9a-f]{8}", "mixlora-*", str(p.relative_to(root))): p
                for p in root.rglob("*.safetensors") if "checkpoints" not in p.parts}
    found_files, expected_files = files(found), files(expected)
    assert expected_files and sorted(found_files) == sorted(expected_files)
    for file, path in expected_files.items():
        found_tensors, expected_tensors = read_tensors(found_files[file]), read_tensors(path)
        assert found_tensors.keys() == expected_tensors.keys(), file
        for name, tensor in expected_tensors.items():
            if tensor.is_floating_point():
                torch.testing.assert_close(found_tensors[name], tensor, atol=atol, rtol=0, msg=f"{file}: {name}")
            else:
                assert torch.equal(found_tensors[name], tensor), f"{file}: {name}"


def _task_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    """Two random adapters on the tiny base (the experts of X-LoRA and MeteoRA), and task-tagged data for them."""
    model, _ = lorakit.load_model(str(base_dir))
    paths = {}
    for index, name in enumerate(("copy", "upper")):
        lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), name, activate=False)
        perturb(model, name, seed=index)
        paths[name] = lorakit.save_adapter(model, root / name, name)
    tagged = [dataclasses.replace(e, task=("copy", "upper")[i % 2]) for i, e in enumerate(copy_examples(24))]
    save_jsonl(root / "tagged.jsonl", tagged)
    return paths


def test_every_training_command_trains_on_two_ranks_as_in_one_process(base_dir, data, tmp_path):
    experts = _task_adapters(base_dir, tmp_path / "experts")
    mixtures = {  # X-LoRA: the classifier's scaling pass and the experts' pass use the base twice a step
        "xlora": ["xlora", "train", *[a for n, p in experts.items() for a in ("--expert", f"{n}={p}")], "--layerwise"],
        "meteora": ["meteora", "train", *[a for n, p in experts.items() for a in ("--adapter", f"{n}={p}")]],
    }
    mixtures |= {f"{name}-checkpointing": [*flags, "--gradient-checkpointing"] for name, flags in mixtures.items()}

    def command(name: str, out: Path, grad_accum: int) -> list[str]:
        common = ["--out", str(out / name), "--base", str(base_dir), "--steps", "3", "--grad-accum", str(grad_accum)]
        if name in mixtures:
            return [*mixtures[name], "--data", str(tmp_path / "experts" / "tagged.jsonl"), *common, "--batch-size",
                    "2", "--lr", "0.01", "--seed", "0", "--quiet"]
        train = ["--data", str(data["train"])] if name != "two-adapters" else \
            ["--data", f"a={data['train']}", "--data", f"b={data['eval']}"]
        flags = [f for f in METHODS.get(name, []) if grad_accum == 1 or f != "--fsdp"]
        return ["train", *train, *FLAGS, *common, *flags]

    names = [*METHODS, "two-adapters", *mixtures]  # two adapters in one batch: each one's tokens over both ranks
    worker = str(Path(__file__).with_name("distributed_worker.py"))
    for where, grad_accum, launch in (("ranks", 1, standalone(2)), ("single", 2, [])):
        commands = tmp_path / f"{where}.json"
        commands.write_text(json.dumps([command(name, tmp_path / where, grad_accum) for name in names]))
        # One thread in the lone process too: LoRA-GA's SVD of a tiny random model's gradient is so ill-conditioned
        # that another summation order (two threads) moves its start by 0.7.
        _run([*(launch or [sys.executable]), worker, str(commands)], timeout=600)
    for name in names:
        _same_outputs(tmp_path / "ranks" / name, tmp_path / "single" / name, atol=LOOSER.get(name, 1e-5))
    for name in ("xlora", "meteora"):  # recomputing the blocks changes nothing (the classifier's pass included)
        _same_outputs(tmp_path / "single" / f"{name}-checkpointing", tmp_path / "single" / name, atol=1e-6)


def test_fsdp_shards_the_model_and_trains_the_data_parallel_adapter(base_dir, data, two_ranks, tmp_path):
    out = tmp_path / "run"
    _run([*standalone(2), *LORAKIT, *_train(base_dir, data, out, "--steps", "6", "--grad-accum", "2", "--fsdp",
                                             "--save-every", "3", "--eval-data", str(data["eval"]),
                                             "--eval-every", "3")])
    _assert_same_adapter(out, two_ranks[0])
    found, expected = _metrics(out), _metrics(two_ranks[0])
    def eval_losses(rows):
        return [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(eval_losses(found)) == 2 and eval_losses(found) == pytest.approx(eval_losses(expected), abs=1e-5)
    def parameter_bytes(run: Path) -> int:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(row["parameter_bytes_per_rank"] for row in rows if "parameter_bytes_per_rank" in row)
    assert parameter_bytes(out) <= 0.55 * parameter_bytes(two_ranks[0])  # each rank holds half of every weight
    saved = read_tensors(list_checkpoints(out)[-1] / "trainable.safetensors")  # whole tensors, not shards
    adapter = read_tensors(out / ADAPTER)
    assert {tuple(t.shape) for t in saved.values()} == {tuple(t.shape) for t in adapter.values()}


@pytest.mark.parametrize(("flags", "message"), [
    (["--fsdp"], "launch with torchrun or --nproc N"),
    (["--fsdp", "--optimizer", "lora-pro"], "use adamw with --fsdp"),
    (["--fsdp", "--method", "dylora"], "train it without --fsdp"),
    (["--fsdp", "--quantize", "nf4"], "FSDP2 does not shard"),
    (["--fsdp", "--init", "loftq"], "FSDP2 does not shard"),
])
def test_fsdp_refuses_what_it_cannot_shard(base_dir, data, tmp_path, capsys, flags, message):
    assert main(_train(base_dir, data, tmp_path / "run", "--steps", "1", *flags)) == 2
    assert message in capsys.readouterr().err


def test_fewer_estimation_batches_than_ranks_is_refused_on_every_rank(base_dir, tmp_path):
    save_jsonl(tmp_path / "two.jsonl", copy_examples(2))  # one batch of 2: nothing for the second rank to estimate
    train = ["train", "--data", str(tmp_path / "two.jsonl"), "--out", str(tmp_path / "run"), "--base", str(base_dir),
             *FLAGS, "--steps", "1", "--init", "eva"]
    result = subprocess.run([*standalone(2), *LORAKIT, *train], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    assert result.returncode != 0 and "estimate the initialisation from 1 batch(es)" in result.stderr
    assert not (tmp_path / "run" / ADAPTER).exists()
