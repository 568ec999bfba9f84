"""Chunk-wise training (SeCO ``--chunk-size``, SpaCO ``--sparse-chunks``): SeCO's gradient is back-propagation's
through the whole sequence (fp64, 1e-10) for any chunk size, with padding, packing and per-row adapters, and dropout
drawn as in one chunk-by-chunk forward; SpaCO with K = N is SeCO; over every draw, the paper's weights keep each
chunk's own terms and shrink the cross-chunk terms by N(K-1)/(K(N-1)), the unbiased draw keeps every term; every
method that only changes the adapter or the optimizer trains the adapter whole sequences train."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.cli.main import main
from lorakit.data.encoding import Encoded
from lorakit.data.jsonl import save_jsonl
from lorakit.data.packing import collate_packed, pack
from lorakit.models.chunk_cache import ChunkCache, chunk_forward_inputs
from lorakit.models.supervised_loss import (
    logits_loss,
    next_token_labels,
    outputs_at_targets,
    per_adapter_loss,
    supervised_outputs,
)
from lorakit.train import train
from lorakit.train.chunk_weights import ChunkWeights, SparseChunks, chunk_weights
from lorakit.train.chunked import ChunkedSequence, ChunkwiseBackward
from tests.helpers import char_tokenizer, copy_examples, labelled_batch, read_tensors, tiny_llama, token_batch


def _fp64_model(layers: int = 2, dropout: float = 0.0, adapters: tuple[str, ...] = ("default",)):
    """The tiny Llama (``layers`` decoder layers) with random adapters on every linear layer, in fp64 throughout
    (Llama's RMSNorm computes in fp32 whatever the model's precision: here in fp64)."""
    model = tiny_llama()
    for norm in model.modules():
        if isinstance(norm, LlamaRMSNorm):
            norm.forward = partial(_rms_norm, norm)
    if layers != model.config.num_hidden_layers:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    for index, name in enumerate(adapters):
        torch.manual_seed(10 + index)
        lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets="all-linear", dropout=dropout), name)
        for parameter in model.parameters():
            if parameter.requires_grad:
                with torch.no_grad():
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.double().train()


def _rms_norm(norm: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    return norm.weight * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _long_batch(rows: int = 2, length: int = 37) -> dict:
    """Random tokens; row 0's first 5 labels masked, row 1 padded from 33 and labelled up to 29."""
    ids = token_batch(rows, length)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[0, :5] = -100
    labels[1, 30:] = -100
    mask[1, 33:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _summed(outputs, batch):
    return logits_loss(outputs)


def _assert_close(found: dict, expected: dict, atol: float = 1e-10) -> None:
    assert found.keys() == expected.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(found[name], grad, atol=atol, rtol=0, msg=name)


def _seco(model, batch, chunk_size: int, loss_of=_summed) -> tuple[float, dict]:
    loss = ChunkwiseBackward(chunk_size)(model, batch, loss_of, step=0, micro_batch=0)
    return loss, _gradients(model)


def _full(model, batch, loss_of=_summed) -> tuple[float, dict]:
    loss = loss_of(supervised_outputs(model, batch), batch)
    loss.backward()
    return loss.item(), _gradients(model)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 16, 37, 64])  # 5, 8 and 16 do not divide 37
def test_seco_gradients_equal_back_propagation_through_the_whole_sequence(chunk_size):
    model, batch = _fp64_model(), _long_batch()
    expected_loss, expected = _full(model, batch)
    loss, found = _seco(model, batch, chunk_size)
    assert len(expected) == 28  # A and B of 7 linear layers x 2 blocks
    _assert_close(found, expected)
    assert math.isclose(loss, expected_loss, rel_tol=0, abs_tol=1e-10)


def test_seco_on_packed_rows_keeps_each_example_to_itself():
    model = _fp64_model()
    examples = [Encoded(input_ids=ids, labels=[-100] * 3 + ids[3:]) for ids in token_batch(5, 13).tolist()]
    batch = collate_packed(pack(examples[:3], 40) + pack(examples[3:], 40), pad_id=0)
    assert batch["input_ids"].shape == (2, 39)
    _, expected = _full(model, batch)
    _, found = _seco(model, batch, 6)
    _assert_close(found, expected)


def test_seco_trains_each_rows_own_adapter_with_its_own_mean():
    model = _fp64_model(adapters=("a", "b"))
    batch = {**_long_batch(), "adapter_per_row": ["a", "b"]}
    counts = {"a": 31, "b": 29}

    def own_mean(outputs, rows):
        return per_adapter_loss(outputs, rows, counts)

    _, expected = _full(model, batch, own_mean)
    _, found = _seco(model, batch, 7, own_mean)
    _assert_close(found, expected)


def test_seco_draws_dropout_as_one_forward_chunk_by_chunk():
    """The reference runs the chunks in order with gradients through a cache that keeps its graph."""
    model, batch, chunk_size = _fp64_model(dropout=0.3), _long_batch(), 8
    torch.manual_seed(3)
    targets, total, prefix = next_token_labels(batch["labels"]), 0.0, None
    for start in range(0, 37, chunk_size):
        end = min(start + chunk_size, 37)
        cache = ChunkCache(prefix)
        inputs = chunk_forward_inputs(batch, start, end, torch.float64, torch.device("cpu"))
        total = total + logits_loss(outputs_at_targets(model, {**inputs, "cache": cache}, targets[:, start:end]))
        own = cache.own_layers(2)
        prefix = own if prefix is None else [(torch.cat([keys, k], 2), torch.cat([values, v], 2))
                                             for (keys, values), (k, v) in zip(prefix, own, strict=True)]
    total.backward()
    expected = _gradients(model)
    torch.manual_seed(3)
    _, found = _seco(model, batch, chunk_size)
    _assert_close(found, expected)
    _, plain = _full(model, batch)  # whole-sequence dropout draws other masks
    assert max((plain[n] - found[n]).abs().max() for n in found) > 1e-3


def _weighted(model, batch, chunk_size: int, loss: list[float], carried: list[float] | None = None) -> dict:
    weights = torch.tensor([loss] * batch["input_ids"].shape[0], dtype=torch.float64)
    carry = weights if carried is None else torch.tensor([carried] * batch["input_ids"].shape[0], dtype=torch.float64)
    ChunkedSequence(model, batch, chunk_size).backpropagate(ChunkWeights(weights, carry), _summed)
    return _gradients(model)


def _one_row(length: int = 32) -> dict:
    ids = token_batch(1, length, seed=4)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_spaco_with_every_chunk_drawn_is_seco():
    model, batch = _fp64_model(), _one_row()
    _, seco = _seco(model, batch, 8)
    sparse = ChunkwiseBackward(8, SparseChunks(4, "paper"))
    sparse(model, batch, _summed, step=3, micro_batch=1)
    found = _gradients(model)
    assert all(torch.equal(found[name], grad) for name, grad in seco.items())


@pytest.mark.parametrize("estimator", ["paper", "unbiased"])
def test_spaco_returns_the_whole_loss(estimator):
    model, batch = _fp64_model(), _long_batch()
    expected, _ = _full(model, batch)
    for micro_batch in range(3):  # draws that leave out the last chunks too
        sparse = ChunkwiseBackward(4, SparseChunks(2, estimator))
        assert sparse(model, batch, _summed, step=0, micro_batch=micro_batch) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("budget", [1, 3, 6])
def test_over_every_draw_the_papers_weights_shrink_only_the_cross_chunk_terms(budget):
    """One decoder layer: a chunk's keys and values depend on its own tokens only, so every term of the gradient
    is a chunk's own (through its loss) or one cross-chunk term (a later chunk's loss through its keys/values)."""
    model, batch, chunks = _fp64_model(layers=1), _one_row(), 8
    own = _weighted(model, batch, 4, [1.0] * chunks, carried=[0.0] * chunks)
    cross = {name: grad - own[name] for name, grad in _weighted(model, batch, 4, [1.0] * chunks).items()}
    draws = list(itertools.combinations(range(chunks), budget))
    mean = {name: torch.zeros_like(grad) for name, grad in own.items()}
    for drawn in draws:
        weights = [chunks / budget if i in drawn else 0.0 for i in range(chunks)]
        for name, grad in _weighted(model, batch, 4, weights).items():
            mean[name] += grad / len(draws)
    shrink = chunks * (budget - 1) / (budget * (chunks - 1))  # 0, 2/3, 8/9
    _assert_close(mean, {name: grad + shrink * cross[name] for name, grad in own.items()})
    assert max(c.abs().max() for c in cross.values()) > 1e-2  # the cross-chunk terms are not negligible


def test_over_every_draw_the_unbiased_estimator_gives_secos_gradient():
    model, batch, chunks, budget = _fp64_model(layers=2), _one_row(), 4, 2  # two layers: terms through 3+ chunks
    seco = _weighted(model, batch, 8, [1.0] * chunks)
    p = budget / chunks
    mean = {name: torch.zeros_like(grad) for name, grad in seco.items()}
    papers = {name: torch.zeros_like(grad) for name, grad in seco.items()}
    for drawn in itertools.product((False, True), repeat=chunks):
        probability = math.prod(p if d else 1 - p for d in drawn)
        for name, grad in _weighted(model, batch, 8, [1 / p if d else 0.0 for d in drawn]).items():
            mean[name] += probability * grad
    for drawn in itertools.combinations(range(chunks), budget):
        for name, grad in _weighted(model, batch, 8, [chunks / budget if i in drawn else 0.0
                                                      for i in range(chunks)]).items():
            papers[name] += grad / math.comb(chunks, budget)
    _assert_close(mean, seco)
    assert max((papers[n] - seco[n]).abs().max() for n in seco) > 1e-3  # the paper's draw is biased


def test_a_draw_of_no_chunk_still_back_propagates_one_with_weight_zero():
    model, batch = _fp64_model(), _long_batch()
    batch["labels"][:, :9] = -100  # the first chunk with a loss is chunk 2
    loss = ChunkedSequence(model, batch, 4).backpropagate(ChunkWeights(torch.zeros(2, 10), torch.zeros(2, 10)),
                                                          _summed)
    grads = _gradients(model)
    assert len(grads) == 28 and all(not g.any() for g in grads.values())
    assert loss == pytest.approx(_full(model, batch)[0], abs=1e-10)


def test_the_draw_is_a_function_of_seed_step_and_micro_batch():
    draw = SparseChunks(2, "paper", seed=5)

    def weights(step, micro_batch):
        return chunk_weights([6, 3, 1, 0], 6, draw, draw.generator(step, micro_batch)).loss

    assert torch.equal(weights(4, 1), weights(4, 1)) and not torch.equal(weights(4, 1), weights(4, 2))
    found = weights(4, 1)
    assert (found[0] > 0).sum() == 2 and set(found[0].tolist()) == {0.0, 3.0}
    assert (found[1] > 0).sum() == 2 and set(found[1, :3].tolist()) == {0.0, 1.5} and not found[1, 3:].any()
    assert found[2].tolist() == [1.0, 0, 0, 0, 0, 0] and not found[3].any()  # K >= N: every chunk, weight 1
    unbiased = chunk_weights([400], 400, SparseChunks(100, "unbiased"), torch.Generator().manual_seed(0)).loss
    assert set(unbiased.unique().tolist()) == {0.0, 4.0} and 70 < (unbiased > 0).sum() < 130


def _train(base_dir, data, out, *flags: str) -> dict[str, torch.Tensor]:
    assert main(["train", "--data", str(data), "--out", str(out), "--base", str(base_dir), "--steps", "3",
                 "--batch-size", "4", "--rank", "4", "--alpha", "8", "--lr", "0.01", "--seed", "0", "--quiet",
                 *flags]) == 0
    return {f"{p.name}:{k}": v for p in sorted(out.glob("*.safetensors")) for k, v in read_tensors(p).items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunked") / "train.jsonl"
    save_jsonl(path, copy_examples(24))
    return path


@pytest.mark.parametrize("flags", [[], ["--grad-accum", "2"], ["--pack", "--max-length", "64"],
                                   ["--method", "dylora"], ["--method", "codyra"], ["--method", "l4q"],
                                   ["--optimizer", "allora"], ["--init", "eva"],
                                   ["--init", "lora-ga"], ["--init", "lq-lora", "--bits", "3",
                                                           "--quant-iterations", "2"],
                                   ["--quantize", "nf4"], ["--gradient-checkpointing"]],
                         ids=["lora", "accumulation", "packing", "dylora", "codyra", "l4q", "allora",
                              "eva", "lora-ga", "lq-lora", "nf4", "checkpointing"])
def test_seco_trains_the_adapter_whole_sequences_train(base_dir, data, tmp_path, flags):
    whole = _train(base_dir, data, tmp_path / "whole", *flags)
    chunked = _train(base_dir, data, tmp_path / "chunked", *flags, "--chunk-size", "7")
    # Chunks attend through an explicit mask, whole sequences through transformers' own: sums in another order,
    # whose 1e-7 Adam grows to ~4e-5 on elements whose gradient is near 0 (A where B was 0); a wrong gradient
    # moves the adapter by the learning rate (1e-2).
    _assert_close(chunked, whole, atol=1e-4)


def test_lora_pro_steps_alike_in_fp64():
    """LoRA-Pro inverts B^T B + 1e-8 I, which at B = 0 grows fp32 rounding 1e8-fold: compared in fp64."""
    trained = []
    for chunk_size in (None, 7):
        model = _fp64_model(adapters=())
        torch.manual_seed(0)
        lorakit.attach(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
        model.double()
        config = lorakit.TrainConfig(steps=3, batch_size=4, lr=1e-2, optimizer="lora-pro", chunk_size=chunk_size)
        train(model, char_tokenizer(), copy_examples(12), config, progress=False)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    _assert_close(trained[1], trained[0], atol=1e-9)


def test_spaco_trains_a_sample_and_logs_the_whole_loss(base_dir, data, tmp_path):
    """(Resuming SpaCO and SeCO: tests/train/test_conformance.py.)"""
    spaco = _train(base_dir, data, tmp_path / "spaco", "--chunk-size", "7", "--sparse-chunks", "2", "--log-every", "1")
    seco = _train(base_dir, data, tmp_path / "seco", "--chunk-size", "7", "--log-every", "1")
    assert any(not torch.equal(seco[name], tensor) for name, tensor in spaco.items())
    losses = [[row["loss"] for row in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
               if "loss" in row] for name in ("spaco", "seco")]
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-6)  # step 1: the same weights, the whole loss


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "mixlora"], "MixLoraTraining adds a loss of the whole sequence"),
    (["--regularizer", "ba-lora"], "BaLoraRegularizer adds a loss of the whole sequence"),
    (["--compile"], "Use one of --compile and --chunk-size"),
    (["--fsdp"], "--chunk-size runs as many forwards as each rank's sequences have chunks"),
])
def test_what_needs_the_whole_sequence_is_refused(base_dir, data, tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "out"), "--base", str(base_dir), "--steps",
                 "1", "--chunk-size", "7", "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_chunk_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="sparse_chunks=2 is invalid: SpaCO samples chunks: set chunk_size too"):
        lorakit.TrainConfig(sparse_chunks=2)
    with pytest.raises(ConfigError, match="chunk_size=0 is invalid"):
        lorakit.TrainConfig(chunk_size=0)
    with pytest.raises(ConfigError, match="sparse_chunk_estimator='fair' is invalid: one of paper, unbiased"):
        lorakit.TrainConfig(chunk_size=4, sparse_chunks=2, sparse_chunk_estimator="fair")


def test_a_model_whose_attention_bypasses_the_cache_is_refused():
    model, batch = _fp64_model(), labelled_batch()
    model.model.layers[1].self_attn.forward = _without_cache(model.model.layers[1].self_attn.forward)
    with pytest.raises(ConfigError, match=r"2 attention layers .* did for layers \[0\]"):
        ChunkwiseBackward(4)(model, batch, _summed, step=0, micro_batch=0)


def _without_cache(forward):
    def run(*args, cache=None, **kwargs):
        return forward(*args, **kwargs)
    return run
