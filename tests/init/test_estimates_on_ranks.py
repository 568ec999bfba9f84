"""LoRA-GA's gradients, LQ-LoRA's Fisher and EVA's estimate made by two real ``torchrun`` ranks on gloo, each from
its share of the batches (``Ranks.share``), equal the one-process estimates from all of them, bit for bit: the
gradient sums are float64 (their order does not reach the fp32 result) and EVA folds every rank's layer inputs
in the one-process order. LQ-LoRA's cost sweep, each rank sweeping its share of the matrices, is the one-process
table too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lorakit.init.eva import EvaEstimate
from tests.helpers import read_tensors
from tests.helpers.torchrun import standalone

WORKER = str(Path(__file__).with_name("estimates_worker.py"))
ROOT = Path(__file__).resolve().parents[2]


def _estimates(command: list[str], out: Path) -> Path:
    # One thread each: a lone process with two would compute every batch's forward in another summation order.
    result = subprocess.run([*command, WORKER, str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_ranks_estimate_from_their_shares_what_one_process_estimates_from_all(tmp_path):
    ranks = _estimates(standalone(2), tmp_path / "ranks")
    alone = _estimates([sys.executable], tmp_path / "alone")
    for file in ("lora_ga.safetensors", "fisher.safetensors", "lq_lora_costs.safetensors"):
        found, expected = read_tensors(ranks / file), read_tensors(alone / file)
        assert found.keys() == expected.keys() and (len(expected) > 10 or expected["costs"].shape == (14, 8))
        for name, tensor in expected.items():
            assert torch.equal(found[name], tensor), f"{file}: {name}"
    assert int(read_tensors(ranks / "lora_ga.safetensors")["num_batches"]) == 7
    for tau, batches in (("0.9", None), ("1.0", 7)):
        found, expected = EvaEstimate.load(ranks / f"eva-{tau}"), EvaEstimate.load(alone / f"eva-{tau}")
        assert found.batches == expected.batches and (batches is None or found.batches == batches)
        assert found.ranks == expected.ranks and found.not_converged == expected.not_converged
        for name, module in expected.modules.items():
            for key in ("components", "singular_values", "explained_variance_ratio"):
                assert torch.equal(getattr(found.modules[name], key), getattr(module, key)), f"eva {name}.{key}"
