"""What lorakit 0.1.0 wrote (no ``lorakit.json``; tests/fixtures/release-0.1.0) still loads, to the same logits.

The directories are copied as they are; only the absolute paths 0.1.0 recorded (the base, X-LoRA experts
without ``--bundle``, MeteoRA adapters) are pointed at the copy, as they were valid where they were written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.io.metadata import METADATA_FILE

RELEASE = Path(__file__).parent.parent / "fixtures" / "release-0.1.0"
EXPECTED = json.loads((RELEASE / "expected.json").read_text())
# The kind lorakit.load reports for each directory (a LoRA-GA or DyLoRA export is a plain adapter).
KINDS = {"adapter": "adapter", "caps": "adapter", "lora-ga": "adapter", "dylora-r1": "adapter",
         "mixlora": "mixlora", "xlora": "xlora", "xlora-bundled": "xlora", "meteora": "meteora",
         "merged": "model", "full": "model"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A copy of the release fixtures with the recorded absolute paths pointing into the copy."""
    root = tmp_path_factory.mktemp("release") / "fixtures"
    shutil.copytree(RELEASE, root)
    for config in root.rglob("*.json"):
        config.write_text(config.read_text().replace(EXPECTED["root"], str(root)))
    return root


def test_the_fixtures_are_release_directories():
    """They carry no lorakit.json (so they test the fallback), and cover every kind."""
    assert not list(RELEASE.rglob(METADATA_FILE))
    assert set(EXPECTED["kinds"]) == set(KINDS)
    assert set(KINDS.values()) == {"adapter", "model", "xlora", "mixlora", "meteora"}


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("into_model", [False, True], ids=["recorded-base", "given-model"])
def test_each_release_directory_loads_to_the_release_logits(release, name, into_model):
    model = lorakit.load_model(release / "base")[0] if into_model else None
    loaded = lorakit.load(release / name, model)
    assert loaded.kind == KINDS[name]
    assert (loaded.tokenizer is None) == into_model
    if into_model:
        assert loaded.base is model
    with torch.no_grad():
        got = loaded.model(torch.tensor(EXPECTED["ids"])).logits
    expected = load_file(str(RELEASE / "expected.safetensors"))[name]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_adapters_change_the_base(release):
    """The logits compared above are not the base's own (each directory changes something)."""
    expected = load_file(str(RELEASE / "expected.safetensors"))
    base = lorakit.load_model(release / "base")[0]
    with torch.no_grad():
        plain = base(torch.tensor(EXPECTED["ids"])).logits
    for name in KINDS:
        assert not torch.allclose(expected[name], plain, atol=1e-6), name


def test_release_adapter_names(release):
    assert lorakit.load(release / "xlora").adapters == ("copy", "caps")
    assert lorakit.load(release / "meteora").adapters == ("copy", "caps")
    assert lorakit.load(release / "mixlora").adapters == ("attention", "expert0", "expert1")
    assert lorakit.load(release / "adapter").adapters == ("default",)
    assert lorakit.load(release / "merged").adapters == ()
