"""``lorakit eval --adapter DIR --json`` takes every kind of directory; commands that cannot apply refuse by kind."""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.analysis.subjects import load_subject
from lorakit.cli.main import main
from lorakit.data.source import load_examples
from lorakit.eval.exact_match import evaluate
from lorakit.eval.generate import generate
from tests.loading.direct import direct_model


@pytest.mark.parametrize("name", ["adapter", "xlora", "mixlora", "meteora", "merged"])
def test_eval_json_takes_every_kind(written, name, capsys):
    root, kinds = written
    data = str(root / "train.jsonl")
    assert main(["eval", "--base", str(root / "base"), "--adapter", str(root / name), "--data", data, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokenizer = lorakit.load_model(root / "base")[1]
    expected = evaluate(direct_model(kinds[name], root / name, root), tokenizer, load_examples(data, split="test"))
    assert metrics == pytest.approx(expected.metrics())
    assert metrics["n"] == 4


@pytest.mark.parametrize(("name", "reason"), [("xlora", "its experts are mixed per token"),
                                              ("mixlora", "its experts are routed per token"),
                                              ("meteora", "its gates route each token"),
                                              ("merged", "it is a whole model already")])
def test_merge_refuses_what_it_cannot_merge_by_kind(written, name, reason, tmp_path, capsys):
    root, _ = written
    kind = "model" if name == "merged" else name
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(root / name),
                 "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert f"lorakit merge cannot merge the {kind} directory {root / name}: {reason}" in error
    assert not (tmp_path / "out").exists()


def test_merge_of_an_adapter_writes_a_model_directory(written, tmp_path):
    root, _ = written
    assert main(["merge", "--base", str(root / "base"), "--adapter", str(root / "lora-ga"),
                 "--out", str(tmp_path / "m")]) == 0
    assert lorakit.load(tmp_path / "m").kind == "model"


@pytest.mark.parametrize("name", ["xlora", "mixlora", "meteora"])
def test_analyze_refuses_a_mixture_by_kind(written, name):
    root, _ = written
    with pytest.raises(lorakit.ConfigError, match=f"cannot analyse the {name} directory .*no fixed weight update"):
        load_subject(root / name, lorakit.load_model(root / "base")[0])


def test_analyze_reads_an_adapter_and_a_whole_model(written):
    root, _ = written
    base = lorakit.load_model(root / "base")[0]
    assert load_subject(root / "adapter", base).kind == "adapter"
    assert load_subject(root / "full", base).kind == "weights"


def test_the_mixture_commands_refuse_another_kind(written, capsys):
    root, _ = written
    data = str(root / "train.jsonl")
    assert main(["xlora", "eval", "--base", str(root / "base"), "--xlora", str(root / "adapter"), "--data", data]) == 2
    assert "holds a LoRA adapter in the PEFT format (kind 'adapter'), not an X-LoRA model" in capsys.readouterr().err
    assert main(["meteora", "eval", "--base", str(root / "base"), "--meteora", str(root / "xlora"),
                 "--data", data]) == 2
    assert "(kind 'xlora'), not a MeteoRA model" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["adapter", "xlora", "mixlora", "meteora", "merged"])
def test_generate_takes_every_kind(written, name, capsys):
    """Sampled (seeded), so that the text depends on the logits of the kind's model."""
    root, kinds = written
    assert main(["generate", "--base", str(root / "base"), "--adapter", str(root / name), "--prompt", "Copy: abc",
                 "--max-new-tokens", "8", "--sample", "--seed", "3"]) == 0
    tokenizer = lorakit.load_model(root / "base")[1]
    expected = generate(direct_model(kinds[name], root / name, root), tokenizer, ["Copy: abc"], max_new_tokens=8,
                        do_sample=True, seed=3)
    assert capsys.readouterr().out == expected[0] + "\n"
    assert expected[0].strip()


@pytest.mark.parametrize("name", ["adapter", "xlora", "mixlora", "meteora", "full"])
def test_inspect_prints_the_kind(written, name, capsys):
    root, kinds = written
    assert main(["inspect", str(root / name)]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == kinds[name]
