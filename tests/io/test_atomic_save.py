"""``save_adapter`` never leaves a broken or half-new adapter over a good one, and leaves no temp files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import lorakit
import lorakit.io.files
from lorakit import AdapterError, LoraConfig
from tests.helpers import logits, perturb, tiny_llama, token_batch

CONFIG = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
FILES = {"adapter_config.json", "adapter_model.safetensors", "lorakit.json"}


class DiskFull(OSError):
    pass


@pytest.fixture
def model():
    model = tiny_llama()
    lorakit.attach(model, CONFIG, "a")
    perturb(model, "a", seed=1)
    return model


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (hidden temp files included), by name."""
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def loaded_logits(directory: Path) -> torch.Tensor:
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, directory)
    return logits(fresh, token_batch())


@pytest.fixture
def good(model, tmp_path):
    """A good adapter saved from ``model``, its files, and the logits it loads to; then ``model``'s
    adapter is changed so that a re-save would write different weights."""
    directory = tmp_path / "adapter"
    lorakit.save_adapter(model, directory)
    before = snapshot(directory)
    assert set(before) == FILES
    expected = loaded_logits(directory)
    torch.testing.assert_close(expected, logits(model, token_batch()), rtol=0, atol=1e-6)
    perturb(model, "a", seed=2)
    assert not torch.allclose(logits(model, token_batch()), expected)
    return directory, before, expected


def half_then_fail(data, filename, metadata=None):
    """A ``save_file`` that dies halfway: half the bytes reach the file, then the disk is full."""
    blob = safetensors_bytes(data, metadata=metadata)
    with open(filename, "wb") as handle:
        handle.write(blob[: len(blob) // 2])
    raise DiskFull("No space left on device")


def assert_intact(directory: Path, before: dict[str, bytes], expected: torch.Tensor) -> None:
    assert snapshot(directory) == before, "the previous adapter's files changed, or temp files were left"
    assert torch.equal(loaded_logits(directory), expected)


def test_weights_write_failing_midway_keeps_the_previous_adapter(model, good, monkeypatch):
    directory, before, expected = good
    monkeypatch.setattr(lorakit.io.files, "save_file", half_then_fail)
    with pytest.raises(DiskFull):
        lorakit.save_adapter(model, directory)
    assert_intact(directory, before, expected)


def test_config_write_failing_keeps_the_previous_weights_too(model, good, monkeypatch):
    """The config is written after the weights: its failure must not leave new weights beside the old config."""
    directory, before, expected = good

    def refuse(*args, **kwargs):
        raise TypeError("Object of type X is not JSON serializable")

    monkeypatch.setattr(json, "dumps", refuse)
    with pytest.raises(TypeError):
        lorakit.save_adapter(model, directory)
    monkeypatch.undo()
    assert_intact(directory, before, expected)


def test_config_write_failing_midway_keeps_the_previous_adapter(model, good, monkeypatch):
    directory, before, expected = good
    real_write_text = Path.write_text

    def half_text(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise DiskFull("No space left on device")

    monkeypatch.setattr(Path, "write_text", half_text)
    with pytest.raises(DiskFull):
        lorakit.save_adapter(model, directory)
    monkeypatch.undo()
    assert_intact(directory, before, expected)


def test_a_successful_resave_replaces_the_adapter(model, good, monkeypatch):
    directory, before, expected = good
    monkeypatch.setattr(lorakit.io.files, "save_file", half_then_fail)
    with pytest.raises(DiskFull):
        lorakit.save_adapter(model, directory)
    monkeypatch.undo()
    assert lorakit.save_adapter(model, directory) == directory
    after = snapshot(directory)
    assert set(after) == FILES
    assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    new = loaded_logits(directory)
    assert not torch.allclose(new, expected)
    torch.testing.assert_close(new, logits(model, token_batch()), rtol=0, atol=1e-6)


def test_resave_with_another_rank_replaces_both_files(good, tmp_path):
    """Config and weights change together: a rank-2 adapter over a rank-4 one loads as rank 2."""
    directory, before, _ = good
    other = tiny_llama()
    lorakit.attach(other, LoraConfig(rank=2, alpha=4, targets=("q_proj",)), "small")
    perturb(other, "small", seed=4)
    lorakit.save_adapter(other, directory)
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == 2
    assert set(snapshot(directory)) == FILES
    torch.testing.assert_close(loaded_logits(directory), logits(other, token_batch()), rtol=0, atol=1e-6)


def test_failure_saving_into_a_new_directory_leaves_no_files(model, tmp_path, monkeypatch):
    directory = tmp_path / "new"
    monkeypatch.setattr(lorakit.io.files, "save_file", half_then_fail)
    with pytest.raises(DiskFull):
        lorakit.save_adapter(model, directory)
    assert not directory.exists() or list(directory.iterdir()) == []


def test_unknown_adapter_name_writes_nothing(model, good, tmp_path):
    directory, before, expected = good
    with pytest.raises(AdapterError, match="nope"):
        lorakit.save_adapter(model, directory, "nope")
    assert_intact(directory, before, expected)
    fresh = tmp_path / "fresh"
    with pytest.raises(AdapterError, match="nope"):
        lorakit.save_adapter(model, fresh, "nope")
    assert not fresh.exists()


def test_model_without_adapters_writes_nothing(tmp_path):
    with pytest.raises(AdapterError):
        lorakit.save_adapter(tiny_llama(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ambiguous_name_writes_nothing(model, tmp_path):
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("k_proj",)), "b")
    lorakit.set_active(model, "a", "b")
    with pytest.raises(AdapterError, match="name="):
        lorakit.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saved_files_honour_the_umask(model, tmp_path):
    """Temp files must not keep mkstemp's 0600: a serving process under another user reads adapters."""
    previous = os.umask(0o022)
    try:
        lorakit.save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(previous)
    for name in FILES:
        assert stat.S_IMODE((tmp_path / "adapter" / name).stat().st_mode) == 0o644, name
