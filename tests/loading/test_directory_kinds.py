"""How ``lorakit.load`` finds a directory's kind: ``lorakit.json``, else the kinds' own metadata fields; and
what it says about a directory it cannot read."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.io import directory_kinds
from lorakit.io.directory_kinds import DirectoryKind, Loaded, directory_kind, get_kind, kind_names, register_kind
from tests.helpers import perturb, tiny_llama, token_batch

KNOWN = ["adapter", "model", "meteora", "mixlora", "xlora", "quantized-adapter", "l4q-model", "nf-model"]


def test_every_built_in_kind_is_registered_by_import_lorakit():
    assert sorted(kind_names()) == sorted(KNOWN)


def test_an_unknown_kind_names_it_and_the_known_kinds(tmp_path):
    (tmp_path / "lorakit.json").write_text(json.dumps({"format": 1, "kind": "foo"}))
    with pytest.raises(lorakit.FormatError) as error:
        lorakit.load(tmp_path)
    assert f"{tmp_path} holds lorakit.json with kind 'foo'; known kinds: " in str(error.value)
    assert all(kind in str(error.value) for kind in KNOWN)


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "lorakit.json: not valid JSON"),
    ("[1]", "lorakit.json: holds a JSON list, not an object"),
    ('{"format": 2, "kind": "adapter"}', "'format' is 2; this lorakit reads format 1"),
    ('{"kind": "adapter"}', "'format' is None"),
    ('{"format": 1, "kind": 7}', "'kind' is 7; the name of a directory kind is required"),
    ('{"format": 1, "kind": "adapter", "origin": []}', "'origin' is []"),
])
def test_a_damaged_lorakit_json_is_named_with_what_is_wrong(tmp_path, text, expected):
    (tmp_path / "lorakit.json").write_text(text)
    with pytest.raises(lorakit.FormatError, match="lorakit.json") as error:
        lorakit.load(tmp_path)
    assert expected in str(error.value)


def test_a_directory_no_kind_recognises_lists_what_it_holds_and_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "config.json").write_text("{}")  # no model_type: not a model
    with pytest.raises(lorakit.FormatError) as error:
        lorakit.load(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path} holds no lorakit.json and none of: adapter_config.json with a peft_type")
    assert "config.json with a model_type" in message and "xlora_config.json" in message
    assert message.endswith("it holds config.json, notes.txt: not a lorakit, PEFT or model directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lorakit.FormatError, match="holds nothing: not a lorakit, PEFT or model directory"):
        lorakit.load(tmp_path / "empty")
    with pytest.raises(lorakit.FormatError, match="no such directory"):
        lorakit.load(tmp_path / "absent")


def test_a_kind_named_in_lorakit_json_whose_files_are_missing_names_the_file(tmp_path):
    (tmp_path / "lorakit.json").write_text(json.dumps({"format": 1, "kind": "xlora"}))
    with pytest.raises(lorakit.FormatError, match=f"{tmp_path / 'xlora_config.json'}: no such file"):
        lorakit.load(tmp_path)


def test_a_foreign_peft_adapter_loads_with_peft_s_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "lorakit.json").exists()
    assert directory_kind(tmp_path / "peft").name == "adapter"
    loaded = lorakit.load(tmp_path / "peft", tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(token_batch()).logits, model(token_batch()).logits)


def test_a_hugging_face_model_directory_is_a_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "hf")
    assert directory_kind(tmp_path / "hf").name == "model"


def test_a_peft_type_other_than_lora_is_refused_by_the_adapter_loader(tmp_path):
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=("q_proj",)))
    lorakit.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "lorakit.json").unlink()
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(lorakit.FormatError, match="peft_type is 'LOHA'; lorakit loads 'LORA' adapters"):
        lorakit.load(tmp_path / "a", tiny_llama())


def test_a_registered_kind_is_dispatched_to_by_lorakit_json(tmp_path, monkeypatch):
    """Later packages (quantized, served, generated adapters) extend the registry the same way."""
    monkeypatch.setattr(directory_kinds, "_KINDS", dict(directory_kinds._KINDS))
    model = tiny_llama()

    def load(directory, given):
        return Loaded(kind="probe", path=directory, model=given, base=given, tokenizer=None, adapters=("p",))

    probe = register_kind(DirectoryKind(name="probe", holds="a test directory", load=load,
                                        describe=lambda directory: {"path": str(directory)}))
    assert get_kind("probe") is probe and register_kind(probe) is probe
    with pytest.raises(lorakit.ConfigError, match="'probe' is registered already"):
        register_kind(DirectoryKind(name="probe", holds="another", load=load, describe=dict))
    (tmp_path / "lorakit.json").write_text(json.dumps({"format": 1, "kind": "probe"}))
    assert lorakit.load(tmp_path, model).adapters == ("p",)
    with pytest.raises(lorakit.ConfigError, match="unknown directory kind 'nope'; known kinds: adapter"):
        get_kind("nope")


def test_the_adapter_kind_round_trips_through_lorakit_load(tmp_path):
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")))
    perturb(model, "default", seed=3)
    lorakit.save_adapter(model, tmp_path / "a")  # a tiny_llama has no name: the adapter records no base
    loaded = lorakit.load(tmp_path / "a", tiny_llama())
    assert (loaded.kind, loaded.adapters, loaded.tokenizer) == ("adapter", ("default",), None)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(token_batch()).logits, model(token_batch()).logits)
    with pytest.raises(lorakit.FormatError, match="records no base model .*pass the base model"):
        lorakit.load(tmp_path / "a")
