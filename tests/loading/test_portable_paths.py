"""Mixture directories record their experts relative to themselves when they sit inside or beside them, so
a run copied or moved with its experts still loads; a missing expert is named, with where it was looked for."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lorakit
from lorakit.io.paths import portable_path
from lorakit.mixtures.meteora import MeteoraModel, save_meteora
from lorakit.mixtures.xlora import XLoraModel, save_xlora
from tests.fixtures.make_release_fixtures import IDS
from tests.helpers import perturb, tiny_llama, token_batch

MIXTURES = {"xlora": "adapter", "meteora": "adapter"}  # mixture -> the directory of its first expert


def test_portable_path_is_relative_inside_and_beside_and_absolute_elsewhere(tmp_path):
    run = tmp_path / "runs" / "x"
    assert portable_path(run / "experts" / "a", run) == "experts/a"
    assert portable_path(tmp_path / "runs" / "date", run) == "../date"
    assert portable_path(tmp_path / "runs" / "deep" / "er" / "b", run) == "../deep/er/b"
    assert portable_path(tmp_path / "elsewhere" / "c", run) == str((tmp_path / "elsewhere" / "c").resolve())


@pytest.mark.parametrize("mixture", sorted(MIXTURES))
def test_a_copied_tree_loads_from_its_new_place(written, mixture, tmp_path):
    root, _ = written
    copy = tmp_path / "moved"
    shutil.copytree(root, copy)
    original = lorakit.load(root / mixture, lorakit.load_model(root / "base")[0])
    moved = lorakit.load(copy / mixture, lorakit.load_model(copy / "base")[0])
    with torch.no_grad():
        torch.testing.assert_close(moved.model(torch.tensor(IDS)).logits, original.model(torch.tensor(IDS)).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize(("mixture", "what"), [("xlora", "expert 'copy'"), ("meteora", "adapter 'copy'")])
def test_a_missing_expert_is_named_with_where_it_was_looked_for(written, mixture, what, tmp_path):
    root, _ = written
    copy = tmp_path / "moved"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / MIXTURES[mixture])
    with pytest.raises(lorakit.FormatError) as error:
        lorakit.load(copy / mixture, lorakit.load_model(copy / "base")[0])
    message = str(error.value)
    assert f"{what} is missing" in message
    assert f"no such adapter directory at {copy / mixture / '..' / 'adapter'}" in message
    assert "recorded as '../adapter'" in message


def test_experts_elsewhere_are_recorded_absolute_and_still_load(tmp_path):
    model = tiny_llama()
    paths = {}
    for seed, name in enumerate(("a", "b")):
        lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), name, activate=False)
        perturb(model, name, seed=seed)
        paths[name] = lorakit.save_adapter(model, tmp_path / "store" / "adapters" / name, name)
    xmodel = XLoraModel(model, ["a", "b"])
    save_xlora(xmodel, tmp_path / "runs" / "deep" / "x", paths)
    recorded = json.loads((tmp_path / "runs" / "deep" / "x" / "xlora_config.json").read_text())["experts"]
    assert [e["path"] for e in recorded] == [str(paths["a"].resolve()), str(paths["b"].resolve())]
    meteora = MeteoraModel(model, ["a", "b"])
    save_meteora(meteora, tmp_path / "runs" / "deep" / "m", adapter_paths=paths)
    for name, wrapper in (("x", xmodel), ("m", meteora)):
        loaded = lorakit.load(tmp_path / "runs" / "deep" / name, tiny_llama())
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(token_batch()).logits, wrapper.eval()(token_batch()).logits)


def test_a_meteora_directory_without_paths_loads_into_a_model_holding_its_adapters(tmp_path):
    """``save_meteora`` without ``adapter_paths`` (the Python API's gates-only save): the model must hold them."""
    model = tiny_llama()
    for seed, name in enumerate(("a", "b")):
        lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=("q_proj",)), name, activate=False)
        perturb(model, name, seed=seed)
    save_meteora(MeteoraModel(model, ["a", "b"]), tmp_path / "m")
    with pytest.raises(lorakit.FormatError, match="records no adapter paths .* no adapter 'a'; load the adapters"):
        lorakit.load(tmp_path / "m", tiny_llama())
    assert lorakit.load(tmp_path / "m", model).adapters == ("a", "b")
