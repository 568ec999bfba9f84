"""Training commands under ``torchrun``: each joins the process group, trains, and only rank 0 prints; and
``lorakit train --nproc N``, the same command under ``torchrun`` on this machine with N ranks (a convenience for
``torchrun --standalone --nproc_per_node N -m lorakit train ...``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence

from lorakit.errors import ConfigError, TrainingError
from lorakit.parallel.process_group import current_ranks
from lorakit.train.distributed import DEFAULT_TIMEOUT_S, start_process_group, stop_process_group
from lorakit.train.loop import TrainResult
from lorakit.train.peak_memory import peak_resident_mib


def train_in_process_group(train: Callable[[bool], TrainResult], *, quiet: bool,
                           timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Run ``train(progress)`` in torchrun's process group (a lone process: alone) and print its summary on rank 0,
    with rank 0's peak resident memory (``peak_memory_mib``); progress bars only on rank 0 and without ``quiet``."""
    started = start_process_group(timeout_s)
    finished = False
    try:
        result = train(not quiet and current_ranks().main)
        main, finished = current_ranks().main, True
    finally:
        if started:
            stop_process_group(finished=finished)
    if main:
        print(json.dumps({**result.summary(), "peak_memory_mib": peak_resident_mib()}))


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` or ``flag=VALUE``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(f"{flag}="):
            kept.append(arg)
    return kept


def gave_flag(argv: Sequence[str], flag: str) -> bool:
    """Whether ``argv`` sets ``flag`` (``flag VALUE`` or ``flag=VALUE``)."""
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The ``torchrun`` command running ``lorakit`` ``argv`` (without ``--nproc``) on ``nproc`` local ranks."""
    if nproc < 1:
        raise ConfigError(f"--nproc is {nproc}; it must be a positive number of processes")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lorakit", *without_flag(argv, "--nproc")]


def run_torchrun(nproc: int, argv: Sequence[str]) -> None:
    """Run ``lorakit`` ``argv`` on ``nproc`` ranks and wait; a failed rank fails the command (torchrun stops the
    other ranks and prints the failed one's error)."""
    status = subprocess.call(torchrun_command(nproc, argv))
    if status != 0:
        raise TrainingError(f"torchrun exited with status {status}: a rank failed (its error is printed above); "
                            "a checkpointed run resumes with --resume")
