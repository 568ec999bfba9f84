"""One method of ``lorakit compare``: its preset flags, its own `lorakit train` process, its numbers.

Every method trains in its own ``lorakit train`` process (same data, steps, rank, learning rate and
seed; only the method's own flags differ), so each peak memory is that process's own (the
``peak_memory_mib`` its summary reports: :mod:`lorakit.train.peak_memory`). Reported per method: the loss
curve, the steps until the loss (mean of the last
``SMOOTHING`` steps) first reaches ``target_loss``, the final held-out exact match, the trainable
parameters, seconds per step of the training loop, the set-up time before it (LoRA-GA's and EVA's
estimates) and the peak resident memory. A method whose directory already holds a finished run is
not trained again (its steps to the target are recomputed, so a report for another target is cheap),
so an interrupted comparison continues where it stopped; a run made with other flags is refused.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lorakit.errors import ConfigError, TrainingError
from lorakit.io.files import save_json

SMOOTHING = 5
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class MethodPreset:
    """One compared method: what it is, and the ``lorakit train`` flags that select it."""

    summary: str
    flags: tuple[str, ...] = ()


PRESETS: dict[str, MethodPreset] = {
    "lora": MethodPreset("plain LoRA: A Kaiming, B = 0, scale alpha/r, AdamW"),
    "rslora": MethodPreset("rsLoRA: scale alpha/sqrt(r)", ("--rslora",)),
    "lora-ga": MethodPreset("LoRA-GA init from the gradient of 8 batches", ("--init", "lora-ga")),
    "eva": MethodPreset("EVA init from 8 batches of activations, ranks redistributed", ("--init", "eva")),
    "dylora": MethodPreset("DyLoRA: a random nested rank per step", ("--method", "dylora")),
    "lora-pro": MethodPreset("LoRA-Pro: full-space Adam on the equivalent gradient", ("--optimizer", "lora-pro")),
    "allora": MethodPreset("ALLoRA: scaling-free, row-norm adaptive rate", ("--optimizer", "allora")),
    "ba-lora": MethodPreset("BA-LoRA regularisers against the original model", ("--regularizer", "ba-lora")),
    "codyra": MethodPreset("CoDyRA: gated ranks, soft-thresholded, pruned", ("--method", "codyra")),
    "mixlora": MethodPreset("MixLoRA: 8 LoRA experts per FFN, top-2 routing", ("--method", "mixlora")),
    "qlora-nf4": MethodPreset("QLoRA: LoRA on the base quantized to NF4 (blocks of 64, 8-bit scales)",
                              ("--quantize", "nf4")),
    "loftq": MethodPreset("LoftQ: NF4 base and adapter from W ~= Q + L1 L2 (1 alternation)", ("--init", "loftq")),
    **{f"lq-lora-{bits:g}": MethodPreset(f"LQ-LoRA at {bits:g} bits per parameter (small grid, 10 alternations)",
                                         ("--init", "lq-lora", "--bits", f"{bits:g}", "--quant-iterations", "10"))
       for bits in (4.0, 3.0, 2.75, 2.5)},
    **{f"l4q-{bits}": MethodPreset(f"L4Q: quantization-aware LoRA, one {bits}-bit model (groups of 128)",
                                   ("--method", "l4q", "--option", f"l4q_bits={bits}"))
       for bits in (4, 3)},
    **{f"loram-{percent}": MethodPreset(f"LoRAM: trained on the base with {percent}% of FFN channels (and at most "
                                        f"{percent}% of head groups) pruned, recovered for the full base",
                                        ("--loram-ratio", f"{percent / 100:g}"))
       for percent in (25, 50)},
    **{f"loram-{percent}-aligned": MethodPreset(f"LoRAM-{percent} after 50 steps of alignment on the offline corpus",
                                                ("--loram-ratio", f"{percent / 100:g}", "--loram-align-steps", "50"))
       for percent in (25, 50)},
    "qloram-50": MethodPreset("QLoRAM: LoRAM-50 on the pruned base quantized to NF4", ("--loram-ratio", "0.5",
                                                                                        "--quantize", "nf4")),
    "pat-25": MethodPreset("PAT: LoRA + hybrid sparsification modules, 25% of the hidden channels removed, the mask "
                           "hard from 40% of the run on; one smaller model",
                           ("--method", "pat", "--option", "pat_keep=0.75", "--option", "pat_freeze=0.4")),
}
DEFAULT_METHODS = ("lora", "rslora", "lora-ga", "eva", "dylora", "lora-pro", "allora", "ba-lora")


@dataclass
class MethodResult:
    """One method's numbers (see the module docstring)."""

    method: str
    command: str
    losses: list[float]
    final_loss: float
    steps_to_target: int | None
    exact_match: float
    trainable_parameters: int
    seconds_per_step: float
    setup_seconds: float
    peak_memory_mb: float


def smoothed(losses: Sequence[float], window: int = SMOOTHING) -> list[float]:
    """The running mean of the last ``window`` values at each step."""
    return [sum(losses[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(losses))]


def steps_to(losses: Sequence[float], target: float) -> int | None:
    """The first step (1-based) whose smoothed loss is at most ``target``, or None if none is."""
    return next((i + 1 for i, value in enumerate(smoothed(losses)) if value <= target), None)


def _train_command(method: str, data: str, out: Path, train_flags: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "lorakit", "train", "--data", data, "--out", str(out), "--quiet",
            "--log-every", "1", *train_flags, *PRESETS[method].flags]


def _run_training(command: list[str]) -> tuple[dict, float, float]:
    """Run one training process; returns its JSON summary, wall seconds and its own peak RSS in MiB."""
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        raise TrainingError(f"{shlex.join(command)} failed (exit {process.returncode}):\n"
                            f"{process.stderr.strip()[-2000:]}")
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    return summary, time.perf_counter() - started, summary["peak_memory_mib"]


def _loss_curve(run_dir: Path) -> tuple[list[float], float]:
    """The per-step training losses and the training loop's seconds, from ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return [r["loss"] for r in steps], steps[-1]["elapsed_s"]


def _finished(run_dir: Path, command: str, target_loss: float) -> MethodResult:
    """The result a finished run left in ``run_dir`` (steps to ``target_loss`` recomputed); refused if
    that run was trained with another command."""
    result = MethodResult(**json.loads((run_dir / RESULT_FILE).read_text()))
    if result.command != command:
        raise ConfigError(f"{run_dir} holds a run of `{result.command}`, not `{command}`; "
                          "use another --out or remove that directory")
    result.steps_to_target = steps_to(result.losses, target_loss)
    return result


def compare_method(method: str, data: str, out: Path, *, train_flags: Sequence[str], eval_n: int,
                   target_loss: float, base: str) -> MethodResult:
    """Train and score one method in ``out/<method>`` (or read the result a finished run left there)."""
    from lorakit.jobs.evaluate import evaluate_adapter
    run_dir = out / method
    command = _train_command(method, data, run_dir, ["--base", base, *train_flags])
    shown = shlex.join(["lorakit", *command[3:]])
    if (run_dir / RESULT_FILE).is_file():
        return _finished(run_dir, shown, target_loss)
    restart = ["--overwrite"] if run_dir.exists() else []  # a run that stopped before its result: again
    summary, wall, peak = _run_training([*command, *restart])
    losses, loop_seconds = _loss_curve(run_dir)
    scored = evaluate_adapter(data, adapter=run_dir, n=eval_n)  # on its recorded base (PAT's model is its own)
    result = MethodResult(method, shown, losses, smoothed(losses)[-1],
                          steps_to(losses, target_loss), scored.exact_match, summary["trainable_parameters"],
                          loop_seconds / len(losses), wall - loop_seconds, peak)
    save_json(run_dir / RESULT_FILE, asdict(result))
    return result
