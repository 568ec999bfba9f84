"""``lorakit train --quantize``: the run trains on the base quantized as it loads, records it in run.json and in
the adapter (so eval and the server rebuild that base), resumes with it, and refuses combinations that make no
sense."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit import ConfigError, LoraConfig, TrainConfig
from lorakit.jobs.evaluate import load_directory
from lorakit.jobs.finetune import finetune, resume_finetune
from lorakit.quant import NFLinear
from lorakit.serve.cards import RegistrationError
from lorakit.serve.residency import Residency
from tests.helpers import logits, tiny_llama, token_batch

LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    path = tmp_path / "copy.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Copy: {w}", "completion": w}) + "\n"
                            for w in ["ab", "cde", "fa", "bead", "cab", "dab"]))
    return str(path)


def test_a_quantized_run_records_its_base_and_resumes_on_it(base_dir, data, tmp_path):
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, save_every=2, seed=3)
    out = tmp_path / "run"
    finetune(data, out, base=str(base_dir), lora=LORA, config=config, progress=False, quantize="nf4")
    assert json.loads((out / "run.json").read_text())["quantize"] == "nf4"
    assert json.loads((out / "lorakit.json").read_text())["base_quantization"] == "nf4"
    loaded, _ = load_directory(out, None)
    assert isinstance(loaded.model.model.layers[1].self_attn.v_proj.base_layer, NFLinear)
    again, _ = load_directory(out, str(base_dir))  # an explicit base is quantized as the adapter records too
    ids = token_batch()
    assert torch.equal(logits(loaded.model, ids), logits(again.model, ids))

    straight = load_file(out / "adapter_model.safetensors")
    (out / "checkpoints" / "step-4").rename(tmp_path / "later")  # resume from step 2
    resume_finetune(out, progress=False)
    resumed = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)


def test_the_server_refuses_an_adapter_trained_on_another_base(base_dir, data, tmp_path):
    out = tmp_path / "run"
    finetune(data, out, base=str(base_dir), lora=LORA, config=TrainConfig(steps=1, batch_size=2), progress=False,
             quantize="nf4")
    residency = Residency(tiny_llama(), str(base_dir), max_resident=2)
    with pytest.raises(RegistrationError, match="trained on a nf4 base, but this server's base is full precision"):
        residency.register("q", out)


@pytest.mark.parametrize(("quantize", "changes", "message"), [
    ("nf5", {}, "one of nf4, int8"),
    ("nf4", {"full": True}, "--full has nothing to train"),
    ("nf4", {"init": "loftq"}, "--init loftq quantizes the base itself"),
    ("int8", {"method": "l4q"}, "--method l4q quantizes W0 \\+ s B A itself"),
])
def test_senseless_combinations_are_refused_before_anything_loads(base_dir, data, tmp_path, quantize, changes,
                                                                   message):
    lora = LoraConfig(rank=4, alpha=8, targets=("q_proj",), init=changes.get("init", "kaiming"))
    config = TrainConfig(steps=1, full=changes.get("full", False), method=changes.get("method", "lora"))
    with pytest.raises(ConfigError, match=message):
        finetune(data, tmp_path / "run", base=str(base_dir), lora=lora, config=config, progress=False,
                 quantize=quantize)
    assert not (tmp_path / "run").exists()


def test_a_loftq_run_resumes_on_its_saved_bases_without_loading_the_full_precision_model(base_dir, data, tmp_path,
                                                                                         monkeypatch):
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, save_every=2, seed=3)
    out = tmp_path / "run"
    finetune(data, out, base=str(base_dir), lora=LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"),
                                                            init="loftq"), config=config, progress=False)
    straight = load_file(out / "adapter_model.safetensors")
    (out / "checkpoints" / "step-4").rename(tmp_path / "later")  # resume from step 2

    def no_full_precision_base(*args, **kwargs):
        raise AssertionError("the resumed run loaded the full-precision base")

    monkeypatch.setattr("lorakit.jobs.finetune.load_base", no_full_precision_base)
    resume_finetune(out, progress=False)
    resumed = load_file(out / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(resumed[key], straight[key]) for key in straight)
    loaded, _ = load_directory(out, None)
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj.base_layer, NFLinear)
