"""The peak memory ``lorakit train`` reports is the process's own: a child started by a large parent does not
report the parent's size (``ru_maxrss`` would)."""

from __future__ import annotations

import subprocess
import sys

import torch

from lorakit.train.peak_memory import peak_resident_mib

CHILD = "from lorakit.train.peak_memory import peak_resident_mib; print(peak_resident_mib())"


def test_a_child_of_a_large_parent_reports_its_own_peak():
    ballast = torch.ones(512 * 2**20 // 4)  # 512 MiB, touched
    parent = peak_resident_mib()
    child = float(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert parent > 512 and child < parent - 400, (parent, child)
    del ballast
