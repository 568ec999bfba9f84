"""MeteoRA gates trained by lorakit's trainer with the task loss from the JSONL ``task`` field."""

from __future__ import annotations

import torch

import lorakit
from lorakit import LoraConfig
from lorakit.config import TrainConfig
from lorakit.data.example import Example
from lorakit.methods.component import WritesResult
from lorakit.mixtures.meteora import MeteoraConfig, MeteoraModel, MeteoraTaskLoss, load_meteora, save_meteora
from lorakit.train import train
from tests.helpers import char_tokenizer, copy_examples, perturb, run_interrupted, tiny_llama, token_batch

NAMES = ["copy", "upper"]


def meteora(seed: int = 0) -> MeteoraModel:
    model = tiny_llama()
    for index, name in enumerate(NAMES):
        lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), name, activate=False)
        perturb(model, name, seed=index)
    torch.manual_seed(seed)
    return MeteoraModel(model, NAMES, MeteoraConfig(top_k=1))


def labelled_examples() -> list[Example]:
    copies = [Example(prompt=f"Copy: {e.completion}", completion=e.completion, task="copy") for e in copy_examples(8)]
    uppers = [Example(prompt=f"UP {e.completion}", completion=e.completion.upper(), task="upper")
              for e in copy_examples(8, seed=4)]
    return copies + uppers


def frozen_state(xmodel: MeteoraModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in xmodel.named_parameters() if not n.startswith("gates.")}


def test_the_trainer_trains_only_the_gates_on_the_task_loss_and_resumes_exactly(tmp_path, monkeypatch):
    tokenizer, examples = char_tokenizer(), labelled_examples()
    config = TrainConfig(steps=6, batch_size=8, lr=5e-2, save_every=3, log_every=1, seed=1)

    def run(xmodel, out, resume=None):
        components = [MeteoraTaskLoss(xmodel), WritesResult(lambda directory: save_meteora(xmodel, directory))]
        return train(xmodel, tokenizer, examples, config, out_dir=out, resume=resume, progress=False,
                     components=components)

    straight = meteora()
    before, gates = frozen_state(straight), {k: v.clone() for k, v in straight.gate_state().items()}
    result = run(straight, tmp_path / "a")
    after = frozen_state(straight)
    assert all(torch.equal(after[name], before[name]) for name in before)  # base and adapters untouched
    assert all(not torch.equal(straight.gate_state()[k], gates[k]) for k in gates)
    assert result.trainable_parameters == sum(p.numel() for p in straight.gates.parameters())
    interrupted = meteora()
    run_interrupted(monkeypatch, 4, lambda: run(interrupted, tmp_path / "b"))
    resumed = meteora(seed=5)
    run(resumed, tmp_path / "b", resume=tmp_path / "b")
    for key, value in straight.gate_state().items():
        torch.testing.assert_close(resumed.gate_state()[key], value, atol=1e-6, rtol=0, msg=key)
    model = tiny_llama()
    for index, name in enumerate(NAMES):
        lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), name, activate=False)
        perturb(model, name, seed=index)
    loaded = load_meteora(model, tmp_path / "a")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, straight(input_ids=ids).logits, atol=0, rtol=0)


def test_the_task_loss_falls_as_the_gates_learn_the_tasks(tmp_path):
    tokenizer, examples = char_tokenizer(), labelled_examples()
    xmodel = meteora()
    result = train(xmodel, tokenizer, examples, TrainConfig(steps=40, batch_size=16, lr=5e-2, log_every=1),
                   progress=False, components=[MeteoraTaskLoss(xmodel, weight=1.0)])
    gate_losses = [record["extra_loss"] for record in result.metrics if "extra_loss" in record]
    assert len(gate_losses) == 40
    # The gates learn which adapter each task needs (tokens shared by both tasks' prompts stay ambiguous).
    assert sum(gate_losses[-5:]) < 0.75 * sum(gate_losses[:5])


def test_cli_trains_and_evaluates_meteora_over_saved_task_adapters(base_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from lorakit.cli.main import main
    from lorakit.data.jsonl import save_jsonl
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    for index, name in enumerate(NAMES):
        lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")), name, activate=False)
        perturb(model, name, seed=index)
        lorakit.save_adapter(model, tmp_path / name, name)
    save_jsonl(tmp_path / "mix.jsonl", labelled_examples())
    out = tmp_path / "meteora"
    adapters = [arg for name in NAMES for arg in ("--adapter", f"{name}={tmp_path / name}")]
    assert main(["meteora", "train", "--base", str(base_dir), *adapters, "--data", str(tmp_path / "mix.jsonl"),
                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--quiet"]) == 0
    recorded = json.loads((out / "meteora_run.json").read_text())
    assert [name for name, _ in recorded["adapters"]] == NAMES
    capsys.readouterr()
    assert main(["meteora", "eval", "--base", str(base_dir), "--meteora", str(out), "--data",
                 str(tmp_path / "mix.jsonl"), "--n", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2
    assert main(["meteora", "eval", "--base", str(base_dir), "--meteora", str(out), "--composite", "caps,date",
                 "--n", "2"]) == 0
    composite = json.loads(capsys.readouterr().out)
    assert composite["n_prompts"] == 2 and set(composite["per_task"]) == {"caps", "date"}
    save_jsonl(tmp_path / "untagged.jsonl", copy_examples(4))
    assert main(["meteora", "train", "--base", str(base_dir), *adapters, "--data", str(tmp_path / "untagged.jsonl"),
                 "--out", str(tmp_path / "other"), "--steps", "1", "--quiet"]) == 2
    assert "none has one" in capsys.readouterr().err
