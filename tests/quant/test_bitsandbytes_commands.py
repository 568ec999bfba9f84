"""A base loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` through
the commands (``--quantize bnb-nf4``): training records it, ``eval`` / ``generate`` / ``merge`` rebuild it with no
flag, several adapters train in one batch and run in one mixed batch, and PEFT reads the adapter onto the same
bitsandbytes model with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit import LoraConfig, TrainConfig
from lorakit.cli.main import main
from lorakit.core.activation import active, mixed_batch
from lorakit.core.state import lora_layers
from lorakit.io.adapters import load_adapter
from lorakit.jobs.evaluate import load_directory
from lorakit.jobs.finetune import finetune, finetune_adapters, resume_finetune
from lorakit.jobs.merge_model import merge_into_model
from lorakit.quant import load_quantized_base
from lorakit.serve.residency import Residency
from tests.helpers import logits, token_batch

bnb = pytest.importorskip("bitsandbytes")
LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))


def _data(path, words):
    path.write_text("".join(json.dumps({"prompt": f"Copy: {w}", "completion": w}) + "\n" for w in words))
    return str(path)


@pytest.fixture
def run(base_dir, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, save_every=2, seed=3)
    finetune(_data(tmp_path / "copy.jsonl", ["ab", "cde", "fa", "bead", "cab", "dab"]), out, base=str(base_dir),
             lora=LORA, config=config, progress=False, quantize="bnb-nf4")
    return out


def test_training_records_the_bitsandbytes_base_and_everything_rebuilds_it(run, base_dir, tmp_path, capsys):
    assert json.loads((run / "run.json").read_text())["quantize"] == "bnb-nf4"
    assert json.loads((run / "lorakit.json").read_text())["base_quantization"] == "bnb-nf4"
    loaded, _ = load_directory(run, None)
    layers = dict(lora_layers(loaded.model))
    assert len(layers) == 6 and all(type(layer.base_layer).__name__ == "Linear4bit" for layer in layers.values())
    assert type(loaded.model.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"  # unadapted, quantized too
    assert any(float(layer.adapters["default"].B.abs().max()) > 0 for layer in layers.values())  # it trained

    data = _data(tmp_path / "eval.jsonl", ["ab", "cd"])
    assert main(["eval", "--adapter", str(run), "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2
    assert main(["generate", "--adapter", str(run), "--prompt", "Copy: ab", "--max-new-tokens", "3"]) == 0
    report = merge_into_model(run, tmp_path / "merged")  # into the dequantized base: what the adapter computes
    # (up to bitsandbytes' eval mode on this CPU, which repacks its 4-bit codes and computes in bfloat16)
    assert report["vs_unmerged"]["max_abs_logit_difference"] < 1e-2


def test_a_bitsandbytes_run_resumes_to_the_same_adapter(run):
    from safetensors.torch import load_file
    straight = {k: v.clone() for k, v in load_file(run / "adapter_model.safetensors").items()}
    (run / "checkpoints" / "step-4").rename(run.parent / "later")  # resume from step 2
    resume_finetune(run, progress=False)
    resumed = load_file(run / "adapter_model.safetensors")
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)


def test_several_adapters_train_in_one_batch_and_run_in_one_mixed_batch(base_dir, tmp_path):
    datasets = {"copy": _data(tmp_path / "a.jsonl", ["ab", "cd", "ef", "gh"]),
                "again": _data(tmp_path / "b.jsonl", ["ba", "dc", "fe", "hg"])}
    finetune_adapters(datasets, tmp_path / "multi", base=str(base_dir), lora=LORA,
                      config=TrainConfig(steps=3, batch_size=2, lr=1e-2), progress=False, quantize="bnb-nf4")
    model, _ = load_quantized_base(str(base_dir), "bnb-nf4")
    for name in datasets:
        assert json.loads((tmp_path / "multi" / name / "lorakit.json").read_text())["base_quantization"] == "bnb-nf4"
        load_adapter(model, tmp_path / "multi" / name, name)
    ids = token_batch()[:2]
    alone = {}
    for name in datasets:
        with active(model, name):
            alone[name] = logits(model, ids)
    with mixed_batch(model, ["copy", "again"]):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed[0], alone["copy"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alone["again"][1], atol=1e-5, rtol=1e-5)
    residency = Residency(model, str(base_dir), max_resident=2, base_quantization="bnb-nf4")
    assert residency.register("served", tmp_path / "multi" / "copy").name == "served"


def test_peft_reads_the_adapter_onto_the_same_bitsandbytes_model(run, base_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, dtype=torch.float32,
                                                  device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(theirs, run).eval()
    ours, _ = load_directory(run, None)
    ids = token_batch()
    torch.testing.assert_close(logits(ours.model.eval(), ids), logits(theirs, ids), atol=1e-5, rtol=1e-5)
