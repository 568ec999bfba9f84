"""Every command's flags are pinned: one that disappears, is renamed or appears fails here until
``flags_snapshot.json`` (and the CHANGELOG) say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli.main import main
from tests.cli.parsers import command_parsers, flag_spellings

SNAPSHOT = json.loads((Path(__file__).parent / "flags_snapshot.json").read_text())


def test_the_commands_are_the_pinned_ones():
    assert sorted(command_parsers()) == sorted(SNAPSHOT)


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_every_flag_of_a_command_is_pinned(name):
    flags = flag_spellings(command_parsers()[name])
    missing, new = sorted(set(SNAPSHOT[name]) - set(flags)), sorted(set(flags) - set(SNAPSHOT[name]))
    assert (missing, new) == ([], []), f"lorakit {name}: flags gone {missing}, flags new {new}"


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_every_command_documents_itself(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lorakit {name}")


def test_the_flags_of_before_the_generated_cli_are_all_still_there():
    """The flags every command had when they were written by hand (a subset of the snapshot, forever)."""
    training = ["--batch-size", "--compile", "--epochs", "--eval-every", "--grad-accum", "--log-every", "--lr",
                "--max-grad-norm", "--max-length", "--pack", "--save-every", "--seed", "--steps", "--warmup-steps",
                "--weight-decay"]
    adapter = ["--alpha", "--dropout", "--rank", "--rslora", "--targets"]
    method = ["--full", "--method", "--optimizer", "--option", "--regularizer"]
    before = {
        "train": [*adapter, *training, *method, "--base", "--data", "--eval-data", "--init", "--n", "--out",
                  "--overwrite", "--quiet", "--resume"],
        "continual": [*adapter, *training, *method, "--base", "--eval-n", "--n", "--out", "--quiet", "--tasks"],
        "targets": [*adapter, "--base"],
        "xlora train": [*training, "--base", "--bundle", "--data", "--depth", "--eval-data", "--expert",
                        "--global-scaling-weight", "--layerwise", "--n", "--out", "--overwrite", "--quiet", "--resume",
                        "--scaling-pass-value", "--size", "--softmax-topk", "--temperature-softmax", "--top-k",
                        "--trainable-experts"],
        "meteora train": [*training, "--adapter", "--base", "--data", "--n", "--out", "--overwrite", "--quiet",
                          "--task-loss-weight", "--temperature", "--top-k", "--train-adapters"],
        "demo lora": ["--out", "--steps", "--task", "--test-n"],
        "demo xlora": ["--out", "--test-n"], "demo mixtures": ["--out", "--test-n"],
        "demo intruders": ["--out", "--test-n"],
    }
    for name, flags in before.items():
        assert set(flags) <= set(SNAPSHOT[name]), name
