"""LQ-LoRA and LoftQ as inits on the tiny Llama: the quantized base plus the adapter is Q + L1 L2, closer to
the original model than plain quantization; LoftQ is the decomposition at its config; lorakit train runs it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit.config import QuantizedInitConfig, TrainConfig
from lorakit.errors import ConfigError
from lorakit.init.lq_lora import LOFTQ_CONFIG, decompose, estimate_fisher, init_loftq, init_lq_lora
from lorakit.quant import NFLinear, bits_per_parameter, quantize_model
from lorakit.quant.quantized_adapter import QUANTIZED_BASES_FILE
from lorakit.train import train
from lorakit.train.prepare import prepare_adapter
from tests.helpers import char_tokenizer, copy_examples, logits, tiny_llama, token_batch

LORA = lorakit.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"))


def attached(seed: int = 0):
    model = tiny_llama(seed)
    lorakit.attach(model, LORA)
    return model


def test_lq_lora_computes_q_plus_l1_l2_and_beats_plain_quantization():
    model, ids = attached(), token_batch()
    original = logits(tiny_llama(), ids)
    decompositions = init_lq_lora(model, budget=3.0, progress=False)
    reference = tiny_llama()
    with torch.no_grad():
        for name, d in decompositions.items():
            reference.get_submodule(name).weight.copy_(d.quantized.dequantize() + d.L1 @ d.L2)
            assert isinstance(model.get_submodule(name).base_layer, NFLinear)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    used = sum(bits_per_parameter(d.quantized.config) * d.quantized.dequantize().numel()
               for d in decompositions.values())
    assert used <= 3.0 * sum(d.quantized.dequantize().numel() for d in decompositions.values())
    plain = tiny_llama()  # each matrix plainly quantized at the config LQ-LoRA chose for it
    for name, d in decompositions.items():
        quantize_model(plain, d.quantized.config, targets=[name])
    adapted_error = (logits(model, ids) - original).norm()
    assert adapted_error < 0.8 * (logits(plain, ids) - original).norm()
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)


def test_chunked_allocation_keeps_every_chunk_of_matrices_within_the_budget():
    decompositions = init_lq_lora(attached(), budget=2.75, chunks=3, progress=False)
    names = list(decompositions)  # the adapter's modules in order: 6 matrices, chunks of 2
    assert len(names) == 6
    for chunk in (names[0:2], names[2:4], names[4:6]):
        quantized = [decompositions[n].quantized for n in chunk]
        used = sum(bits_per_parameter(q.config) * q.dequantize().numel() for q in quantized)
        assert used <= 2.75 * sum(q.dequantize().numel() for q in quantized) * (1 + 1e-9)
    with pytest.raises(ConfigError, match="bit_chunks is 7, but the adapter has 6 matrices"):
        init_lq_lora(attached(), budget=2.75, chunks=7, progress=False)
    with pytest.raises(ConfigError, match="bit_chunks=0 is invalid"):
        QuantizedInitConfig(bit_chunks=0)


def test_loftq_equals_the_decomposition_run_directly():
    model = attached()
    decompositions = init_loftq(model, iterations=2, progress=False)
    name = "model.layers.1.mlp.down_proj"
    direct = decompose(tiny_llama().get_submodule(name).weight, LORA.rank, LOFTQ_CONFIG, max_iterations=2)
    layer = model.get_submodule(name)
    assert decompositions[name].errors == direct.errors
    assert torch.equal(layer.base_layer.weight, direct.quantized.dequantize())
    torch.testing.assert_close(layer.adapters["default"].B * layer.adapters["default"].scale, direct.L1)
    torch.testing.assert_close(layer.adapters["default"].A, direct.L2)


def test_the_fisher_covers_every_target_and_is_non_negative():
    model = tiny_llama()
    tokens = token_batch(rows=1)
    batches = [{"input_ids": tokens, "labels": tokens, "attention_mask": torch.ones_like(tokens)}] * 2
    fisher = estimate_fisher(model, batches, targets=LORA, progress=False)
    assert len(fisher) == 6
    assert all((f >= 0).all() and f.sum() > 0 for f in fisher.values())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("init", ["lq-lora", "loftq"])
def test_a_training_run_starts_from_the_quantized_init_and_resumes_its_base(init, tmp_path):
    config = TrainConfig(steps=2, batch_size=2, lr=1e-2, seed=2)
    lora, examples = dataclasses.replace(LORA, init=init), copy_examples(8)
    settings = QuantizedInitConfig(bits=3.0, fisher_batches=2, iterations=3)
    model = tiny_llama()
    prepared = prepare_adapter(model, char_tokenizer(), examples, lora, config, run_dir=tmp_path, resume=False,
                               quantized_init=settings)
    assert (tmp_path / QUANTIZED_BASES_FILE).is_file()
    train(model, char_tokenizer(), examples, config, components=prepared.components, out_dir=tmp_path,
          overwrite=True, progress=False)
    loaded = lorakit.load(tmp_path, tiny_llama())  # the run: its adapter on the quantized bases it trained on
    assert loaded.kind == "quantized-adapter"
    assert all(isinstance(m.base_layer, NFLinear) for m in loaded.model.modules() if hasattr(m, "base_layer"))
    ids = token_batch()
    torch.testing.assert_close(logits(loaded.model, ids), logits(model.eval(), ids), atol=1e-5, rtol=1e-5)
    resumed = tiny_llama()
    prepare_adapter(resumed, char_tokenizer(), examples, lora, config, run_dir=tmp_path, resume=True,
                    quantized_init=settings)
    name = "model.layers.0.self_attn.v_proj"
    assert torch.equal(resumed.get_submodule(name).base_layer.weight, model.get_submodule(name).base_layer.weight)
