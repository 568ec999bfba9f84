"""``NAME=PATH`` flags split off a name only when there is one: a path holding ``=`` stays a path."""

from __future__ import annotations

import pytest

from lorakit.cli import train_commands
from lorakit.cli.combine_commands import adapter_argument
from lorakit.cli.main import main
from lorakit.cli.values import module_names, named_values, scalar, split_name
from lorakit.errors import ConfigError


def test_a_plain_name_before_the_first_equals_sign_is_split_off(tmp_path):
    assert split_name("copy=data/copy.jsonl") == ("copy", "data/copy.jsonl")
    assert split_name("lora-r8.v2=task:caps") == ("lora-r8.v2", "task:caps")
    assert split_name("a=b=c") == ("a", "b=c")
    assert split_name("data/copy.jsonl") == (None, "data/copy.jsonl")


@pytest.mark.parametrize("text", ["runs/lr=1e-3/x.jsonl", "task:caps=3", "/abs/a=b", "=x", "../a=b"])
def test_a_left_side_that_is_not_a_plain_name_leaves_the_value_whole(text):
    assert split_name(text) == (None, text)


def test_an_existing_path_is_never_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=1e-3.jsonl").write_text("")
    assert split_name("lr=1e-3.jsonl") == (None, "lr=1e-3.jsonl")
    assert split_name("lr=1e-4.jsonl") == ("lr", "1e-4.jsonl")


def test_named_values_need_every_name_once():
    assert named_values(["b=x", "a=y"], "--expert") == {"b": "x", "a": "y"}
    with pytest.raises(ConfigError, match=r"--expert 'runs/a=b' is not NAME=DIR"):
        named_values(["runs/a=b"], "--expert")
    with pytest.raises(ConfigError, match=r"--adapter 'a=' is not NAME=DIR"):
        named_values(["a="], "--adapter")
    with pytest.raises(ConfigError, match="names 'a' twice: names may not repeat"):
        named_values(["a=x", "a=y"], "--expert")


def test_combine_takes_an_existing_directory_holding_an_equals_sign_whole(tmp_path):
    run = tmp_path / "lr=0.5"
    assert adapter_argument(str(run)) == (str(tmp_path / "lr"), 0.5)  # not there: the weight after the last "="
    run.mkdir()
    assert adapter_argument(str(run)) == (str(run), 1.0)
    assert adapter_argument(f"{run}=-2") == (str(run), -2.0)


def test_module_names_and_scalars():
    assert module_names("all-linear") == "all-linear"
    assert module_names("re:.*proj") == ".*proj"
    assert module_names("q_proj, v_proj,") == ("q_proj", "v_proj")
    assert [scalar(t) for t in ("true", "False", "3", "3.0", "1e-3", "x")] == [True, False, 3, 3.0, 1e-3, "x"]


def test_train_data_with_an_equals_sign_in_its_path_trains_one_adapter(monkeypatch, capsys):
    calls = []

    class Result:
        def summary(self):
            return {"ok": True}

    def record(kind):
        def job(data, out, **kwargs):
            calls.append((kind, data))
            return Result()
        return job

    monkeypatch.setattr(train_commands, "finetune", record("one"))
    monkeypatch.setattr(train_commands, "finetune_adapters", record("several"))
    assert main(["train", "--data", "runs/lr=1e-3/x.jsonl", "--out", "o", "--quiet"]) == 0
    assert main(["train", "--data", "copy=c.jsonl", "--data", "upper=task:caps", "--out", "o", "--quiet"]) == 0
    assert calls == [("one", "runs/lr=1e-3/x.jsonl"), ("several", {"copy": "c.jsonl", "upper": "task:caps"})]
    assert main(["train", "--data", "copy=c.jsonl", "--data", "runs/lr=1e-3/x.jsonl", "--out", "o"]) == 2
    assert "--data 'runs/lr=1e-3/x.jsonl' is not NAME=DATA" in capsys.readouterr().err
