"""The l4q-model directory: save -> lorakit.load gives the finalized model's logits bit for bit, damaged files are
refused naming what is wrong, and L4Q trains (by hand and through the trainer, resumably)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import FormatError, LoraConfig, ModelError, StateError, TrainConfig
from lorakit.io.directory_kinds import directory_kind
from lorakit.quant.l4q import L4QConfig, L4QTraining, UniformQuantizedLinear, finalize_l4q, l4q_layers, save_l4q_model
from lorakit.quant.l4q.l4q_files import METADATA_KEY
from lorakit.quant.quantized_model_dir import MODEL_FILE, QUANTIZED_FILE
from lorakit.train import train
from tests.helpers import (
    char_tokenizer,
    copy_examples,
    logits,
    read_tensors,
    rewrite_tensors,
    run_interrupted,
    tiny_llama,
    token_batch,
)
from tests.quant.test_l4q_linear import l4q_llama

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def finalized():
    model = l4q_llama(bits=4, group_size=48)
    finalize_l4q(model)
    return model


@pytest.fixture
def saved(finalized, tmp_path):
    directory = tmp_path / "l4q"
    save_l4q_model(finalized, char_tokenizer(), directory)
    return directory


def test_save_then_load_gives_identical_logits(finalized, saved, tmp_path):
    assert json.loads((saved / "lorakit.json").read_text()) == {"format": 1, "kind": "l4q-model", "origin": "l4q"}
    assert directory_kind(saved).name == "l4q-model"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    loaded = lorakit.load(saved)
    assert loaded.kind == "l4q-model" and loaded.tokenizer is not None
    ids = token_batch()
    assert torch.equal(logits(loaded.model, ids), logits(finalized, ids))
    with safe_open(str(saved / MODEL_FILE), "pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" in keys and not any(k.startswith(LAYER) for k in keys)
    assert loaded.model.get_submodule(LAYER).codes.dtype == torch.uint8


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    lorakit.attach(model, LoraConfig(rank=2, alpha=4, targets=("q_proj", "down_proj")))
    from lorakit.quant.l4q import attach_l4q
    attach_l4q(model, group_size=32)
    finalize_l4q(model)
    save_l4q_model(model, None, tmp_path / "tied")
    with safe_open(str(tmp_path / "tied" / MODEL_FILE), "pt") as handle:
        assert sum(k in {"model.embed_tokens.weight", "lm_head.weight"} for k in handle.keys()) == 1
    loaded = lorakit.load(tmp_path / "tied").model
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, token_batch()), logits(model, token_batch()))


def test_saving_into_a_run_directory_keeps_its_other_files(finalized, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    save_l4q_model(finalized, None, run)
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert torch.equal(logits(lorakit.load(run).model, token_batch()), logits(finalized, token_batch()))


def test_an_unfinalized_model_is_not_saved(tmp_path):
    with pytest.raises(StateError, match="call finalize_l4q"):
        save_l4q_model(l4q_llama(), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_nan_step_is_refused_naming_the_file_and_tensor(saved):
    rewrite_tensors(saved / QUANTIZED_FILE, lambda t: t[f"{LAYER}.step"].__setitem__((1, 0), float("nan")))
    with pytest.raises(FormatError, match=rf"quantized_linears\.safetensors: tensor '{LAYER}\.step': holds non-finite"):
        lorakit.load(saved)


def test_the_file_packs_the_codes_at_their_bits(saved):
    codes = read_tensors(saved / QUANTIZED_FILE)[f"{LAYER}.codes"]
    assert codes.dtype == torch.uint8 and codes.shape == (64 * 64 * 4 // 8,)  # two 4-bit codes a byte


def test_a_code_out_of_range_is_refused():
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    codes[0, 0] = 16  # packed files cannot hold one (every 4-bit pattern is a code); a layer built by hand can
    step, offset = torch.ones(4, 1), torch.zeros(4, 1)
    with pytest.raises(FormatError, match=r"tensor 'q\.codes': holds code 16, above 15 = 2\^4 - 1"):
        UniformQuantizedLinear(codes, step, offset, None, L4QConfig(bits=4, group_size=8), where="hand", prefix="q.")


def test_a_pickled_file_is_refused(saved):
    torch.save(read_tensors(saved / MODEL_FILE), saved / MODEL_FILE)  # a pickle under the safetensors name
    with pytest.raises(FormatError, match=r"model\.safetensors: not a readable safetensors file"):
        lorakit.load(saved)


def test_a_shape_mismatch_is_refused(saved):
    path = saved / QUANTIZED_FILE
    tensors = read_tensors(path)
    with safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
    header["layers"][LAYER]["shape"] = [64, 63]
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})
    with pytest.raises(FormatError, match=rf"layer '{LAYER}': tensor '{LAYER}\.codes' is torch.uint8 of shape "
                                          r"\[2048\]; the metadata's \[64, 63\] at 4 bits packs into uint8 \(2016,\)"):
        lorakit.load(saved)


def test_a_model_of_other_shapes_is_refused(saved):
    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(FormatError, match=rf"tensor '{LAYER}\.codes' has shape \[64, 64\], but the model's linear "
                                          r"there is \[32, 64\]"):
        lorakit.load(saved, other)


def test_a_stray_tensor_is_refused(saved):
    rewrite_tensors(saved / QUANTIZED_FILE, lambda t: t.__setitem__("extra.codes", torch.zeros(2, dtype=torch.uint8)))
    with pytest.raises(FormatError, match="tensor 'extra.codes' belongs to no layer"):
        lorakit.load(saved)


def test_a_few_adamw_steps_lower_the_loss_and_move_the_steps():
    model = l4q_llama(bits=4, group_size=48)
    steps_before = {n: layer.step.detach().clone() for n, layer in l4q_layers(model).items()}
    parameters = list(lorakit.trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    ids = token_batch(4, 16)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(not torch.equal(layer.step, steps_before[n]) for n, layer in l4q_layers(model).items())


CONFIG = TrainConfig(steps=4, batch_size=4, lr=1e-2, save_every=2, seed=3, weight_decay=0.01)


def _run(out, *, resume: bool = False):
    model = tiny_llama()
    lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=0.1))
    result = train(model, char_tokenizer(), copy_examples(16), CONFIG, components=[L4QTraining(group_size=48)],
                   out_dir=out, overwrite=True, resume=out if resume else None, progress=False)
    return model, result


def test_the_trainer_saves_an_l4q_model_that_loads_with_the_trained_logits(tmp_path):
    model, result = _run(tmp_path / "run")
    assert result.steps == 4 and (tmp_path / "run" / "metrics.jsonl").is_file()
    loaded = lorakit.load(tmp_path / "run")
    assert loaded.kind == "l4q-model"
    assert torch.equal(logits(loaded.model, token_batch()), logits(model, token_batch()))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-4" / "trainable.safetensors"
    assert f"{LAYER}.step" in load_file(str(checkpoint)) and f"{LAYER}.offset" in load_file(str(checkpoint))


def test_an_interrupted_run_resumes_to_the_same_quantized_model(tmp_path, monkeypatch):
    _run(tmp_path / "straight")
    run_interrupted(monkeypatch, 3, lambda: _run(tmp_path / "resumed"))
    _run(tmp_path / "resumed", resume=True)
    straight = read_tensors(tmp_path / "straight" / QUANTIZED_FILE)
    resumed = read_tensors(tmp_path / "resumed" / QUANTIZED_FILE)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)  # codes, steps and offsets alike


def test_passing_it_as_a_base_model_is_refused_not_half_loaded(saved):
    # from_pretrained would read config.json and leave the quantized linears randomly initialised
    with pytest.raises(ModelError, match=r"holds a lorakit 'l4q-model' directory, not a base model; pass it as "
                                         r"--adapter"):
        lorakit.load_model(saved)
