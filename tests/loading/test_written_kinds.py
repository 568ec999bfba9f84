"""Every writer marks its directory with ``lorakit.json``, and ``lorakit.load`` reads each kind back.

The directories come from today's commands (:func:`tests.fixtures.make_release_fixtures.write_fixtures`);
each is compared with the kind's own loader, called directly.
"""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.io.metadata import METADATA_FILE
from lorakit.jobs.inspect import inspect_adapter
from tests.fixtures.make_release_fixtures import IDS
from tests.loading.direct import direct_model

# name -> (kind, origin) of the lorakit.json each command writes
MARKS = {"adapter": ("adapter", None), "caps": ("adapter", None),
         "lora-ga": ("adapter", "lora-ga export (rank 2r, for the original base)"),
         "dylora-r1": ("adapter", "dylora export at rank 1"), "mixlora": ("mixlora", None),
         "xlora": ("xlora", None), "xlora-bundled": ("xlora", None), "meteora": ("meteora", None),
         "merged": ("model", None), "full": ("model", "full fine-tune")}


def test_every_command_writes_its_kind(written):
    root, kinds = written
    assert set(kinds) == set(MARKS)
    for name, (kind, origin) in MARKS.items():
        metadata = json.loads((root / name / METADATA_FILE).read_text())
        expected = {"format": 1, "kind": kind, **({"origin": origin} if origin else {})}
        if name == "merged":
            assert metadata.pop("origin").startswith("merge of "), metadata
        assert metadata == expected, name


@pytest.mark.parametrize("name", sorted(MARKS))
def test_each_written_directory_loads_like_its_own_loader(written, name):
    root, kinds = written
    loaded = lorakit.load(root / name)
    assert loaded.kind == MARKS[name][0] and loaded.tokenizer is not None
    with torch.no_grad():
        got = loaded.model(torch.tensor(IDS)).logits
    with torch.no_grad():
        expected = direct_model(kinds[name], root / name, root)(torch.tensor(IDS)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MARKS))
def test_inspect_names_each_kind(written, name):
    root, _ = written
    report = inspect_adapter(root / name)
    assert report["kind"] == MARKS[name][0]
    assert report["path"] == str(root / name)
    json.dumps(report)  # what lorakit inspect prints


def test_the_experts_of_written_mixtures_are_recorded_relative(written):
    """The experts sit beside the run: recorded as ../adapter, so the whole tree can move."""
    root, _ = written
    xlora = json.loads((root / "xlora" / "xlora_config.json").read_text())
    assert [e["path"] for e in xlora["experts"]] == ["../adapter", "../caps"]
    bundled = json.loads((root / "xlora-bundled" / "xlora_config.json").read_text())
    assert [e["path"] for e in bundled["experts"]] == ["experts/copy", "experts/caps"]
    meteora = json.loads((root / "meteora" / "meteora_config.json").read_text())
    assert meteora["adapter_paths"] == {"copy": "../adapter", "caps": "../caps"}
