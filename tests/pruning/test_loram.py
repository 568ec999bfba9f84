"""LoRAM: structured pruning (plans, cuts, importance), recovery to full shapes, and ``lorakit train --loram-ratio``
end to end on a tiny Llama (4 query heads in 2 key/value groups of head_dim 16, FFN 128, 2 blocks)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, TrainConfig
from lorakit.cli.main import main
from lorakit.config import LoramConfig
from lorakit.data.jsonl import save_jsonl
from lorakit.errors import ConfigError
from lorakit.jobs.finetune import finetune, resume_finetune
from lorakit.pruning.decoder_blocks import HeadGeometry
from lorakit.pruning.importance import gradient_scores, magnitude_scores, random_scores
from lorakit.pruning.loram_training import LoramRecovery
from lorakit.pruning.recovery import recover_tensors
from lorakit.pruning.structured import BlockCut, BlockScores, PruneMap, apply_pruning, plan_pruning
from tests.helpers import copy_examples, labelled_batch, run_interrupted, tiny_llama

PREFIX = "base_model.model.model.layers.0."


def _hand_map() -> PruneMap:
    """Block 0 of a model with 4 query heads in 2 groups of head_dim 2 and FFN 6 keeps group 1, channels 0, 2, 5."""
    return PruneMap(HeadGeometry(heads=4, kv_heads=2, head_dim=2), 6, {0: BlockCut((1,), (0, 2, 5))})


def _hand_tensors(rank: int = 2) -> dict[str, torch.Tensor]:
    """Distinct nonzero values for every factor of the pruned block (hidden 5)."""
    shapes = {"self_attn.q_proj": ((rank, 5), (4, rank)), "self_attn.k_proj": ((rank, 5), (2, rank)),
              "self_attn.o_proj": ((rank, 4), (5, rank)), "mlp.gate_proj": ((rank, 5), (3, rank)),
              "mlp.down_proj": ((rank, 3), (5, rank))}
    tensors, start = {}, 1.0
    for module, (shape_a, shape_b) in shapes.items():
        for factor, shape in (("A", shape_a), ("B", shape_b)):
            count = shape[0] * shape[1]
            tensors[f"{PREFIX}{module}.lora_{factor}.weight"] = torch.arange(start, start + count).view(shape)
            start += count
    return tensors


def test_recovery_places_every_trained_value_at_its_full_index():
    trained = _hand_tensors()
    full = recover_tensors(trained, _hand_map())
    key = PREFIX + "self_attn.q_proj.lora_B.weight"  # query heads 2, 3 = rows 4..7 of 8
    assert full[key].shape == (8, 2) and torch.equal(full[key][4:], trained[key]) and not full[key][:4].any()
    key = PREFIX + "self_attn.k_proj.lora_B.weight"  # key head 1 = rows 2, 3 of 4
    assert full[key].shape == (4, 2) and torch.equal(full[key][2:], trained[key]) and not full[key][:2].any()
    key = PREFIX + "self_attn.o_proj.lora_A.weight"  # columns of query heads 2, 3
    assert full[key].shape == (2, 8) and torch.equal(full[key][:, 4:], trained[key]) and not full[key][:, :4].any()
    key = PREFIX + "mlp.gate_proj.lora_B.weight"
    assert torch.equal(full[key][[0, 2, 5]], trained[key]) and not full[key][[1, 3, 4]].any()
    key = PREFIX + "mlp.down_proj.lora_A.weight"
    assert torch.equal(full[key][:, [0, 2, 5]], trained[key]) and not full[key][:, [1, 3, 4]].any()
    for module in ("self_attn.q_proj.lora_A", "self_attn.o_proj.lora_B", "mlp.down_proj.lora_B"):  # uncut sides
        assert torch.equal(full[f"{PREFIX}{module}.weight"], trained[f"{PREFIX}{module}.weight"])


def test_recovered_delta_is_zero_on_pruned_rows_and_columns_and_the_trained_delta_on_kept_ones():
    trained, full = _hand_tensors(), recover_tensors(_hand_tensors(), _hand_map())
    for module, side, kept in (("mlp.gate_proj", "out", [0, 2, 5]), ("mlp.down_proj", "in", [0, 2, 5]),
                               ("self_attn.o_proj", "in", [4, 5, 6, 7])):
        def delta(t, m=module):
            return t[f"{PREFIX}{m}.lora_B.weight"] @ t[f"{PREFIX}{m}.lora_A.weight"]
        recovered = delta(full)
        kept_part = recovered[kept] if side == "out" else recovered[:, kept]
        assert torch.equal(kept_part, delta(trained))
        assert recovered.abs().sum() == kept_part.abs().sum()  # nothing anywhere else


def test_normal_recovery_fills_pruned_columns_of_a_with_noise_of_variance_one_over_r():
    trained = {k: v for k, v in _hand_tensors(rank=64).items()}
    trained[PREFIX + "mlp.down_proj.lora_A.weight"] = torch.ones(64, 3)
    trained[PREFIX + "mlp.down_proj.lora_B.weight"] = torch.ones(5, 64)
    full = recover_tensors(trained, _hand_map(), recover="normal", seed=1)
    a = full[PREFIX + "mlp.down_proj.lora_A.weight"]
    assert torch.equal(a[:, [0, 2, 5]], torch.ones(64, 3))
    assert a[:, [1, 3, 4]].std().item() == pytest.approx(64 ** -0.5, rel=0.25)
    assert torch.equal(full[PREFIX + "mlp.gate_proj.lora_B.weight"][[1, 3, 4]], torch.zeros(3, 64))  # B rows: zero


def test_recovery_refuses_an_adapter_of_other_shapes():
    trained = _hand_tensors()
    trained[PREFIX + "mlp.gate_proj.lora_B.weight"] = torch.ones(4, 2)
    with pytest.raises(ConfigError, match="gate_proj.lora_B.weight has 4 rows, but the prune map keeps 3"):
        recover_tensors(trained, _hand_map())


def _scores(kv: list[float], channels: list[float]) -> BlockScores:
    return BlockScores(torch.tensor(kv), torch.tensor(channels))


def test_the_plan_drops_the_least_important_whole_groups_and_channels():
    model = tiny_llama()  # 2 groups, FFN 128
    channels = [float(i % 7) for i in range(128)]
    plan = plan_pruning(model, {0: _scores([0.5, 0.2], channels), 1: _scores([0.1, 0.9], channels)}, 0.5)
    assert plan.blocks[0].kv_groups == (0,) and plan.blocks[1].kv_groups == (1,)
    assert len(plan.blocks[0].channels) == 64
    kept = set(plan.blocks[0].channels)
    assert min(channels[i] for i in kept) >= max(channels[i] for i in set(range(128)) - kept)
    # ties break towards the lower index; at most ratio x kv_heads groups go (floor), so 0.4 keeps both
    assert plan_pruning(model, {0: _scores([1.0, 1.0], channels)}, 0.4).blocks[0].kv_groups == (0, 1)
    assert plan_pruning(model, {0: _scores([1.0, 1.0], [1.0] * 128)}, 0.5).blocks[0].channels == tuple(range(64))


def _masked_copy(model, prune_map: PruneMap):
    """The full model with the pruned heads' o_proj columns and the pruned channels' down_proj columns zeroed:
    it computes what the pruned model computes."""
    with torch.no_grad():
        for index, cut in prune_map.blocks.items():
            block = model.model.layers[index]
            heads = prune_map.geometry.query_rows(cut.kv_groups)
            dropped = torch.ones(block.self_attn.o_proj.in_features, dtype=torch.bool)
            dropped[heads] = False
            block.self_attn.o_proj.weight[:, dropped] = 0
            dropped = torch.ones(block.mlp.down_proj.in_features, dtype=torch.bool)
            dropped[list(cut.channels)] = False
            block.mlp.down_proj.weight[:, dropped] = 0
    return model


def test_the_cut_model_computes_what_the_full_model_with_the_structures_zeroed_computes():
    plan = plan_pruning(tiny_llama(), {0: _scores([0.1, 0.9], [float(i) for i in range(128)]),
                                       1: _scores([0.9, 0.1], [float(-i) for i in range(128)])}, 0.5)
    pruned = apply_pruning(tiny_llama(), plan)
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert pruned.model.layers[1].self_attn.k_proj.weight.shape == (16, 64)
    assert pruned.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    batch = labelled_batch()
    torch.testing.assert_close(pruned(input_ids=batch["input_ids"]).logits,
                               _masked_copy(tiny_llama(), plan)(input_ids=batch["input_ids"]).logits,
                               atol=1e-5, rtol=0)


def test_a_recovered_adapter_on_the_full_model_matches_the_pruned_model_with_its_adapter(tmp_path):
    plan = plan_pruning(tiny_llama(), random_scores(tiny_llama(), [0, 1], seed=5), 0.5)
    pruned = apply_pruning(tiny_llama(), plan)
    lorakit.attach(pruned, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for parameter in pruned.parameters():
            if parameter.requires_grad:  # the adapter's A and B only
                parameter.normal_(0, 0.2)
    LoramRecovery(plan).save(pruned, None, tmp_path / "recovered")
    full = _masked_copy(tiny_llama(), plan)
    lorakit.load_adapter(full, tmp_path / "recovered")
    batch = labelled_batch()
    ours = full(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, pruned(input_ids=batch["input_ids"]).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, _masked_copy(tiny_llama(), plan)(input_ids=batch["input_ids"]).logits, atol=1e-3)


def test_magnitude_scores_are_the_norms_of_each_structures_weights():
    model = tiny_llama()
    scores = magnitude_scores(model, [1])[1]
    block = model.model.layers[1]
    group = torch.cat([block.self_attn.q_proj.weight[32:64].flatten(), block.self_attn.k_proj.weight[16:32].flatten(),
                       block.self_attn.v_proj.weight[16:32].flatten(), block.self_attn.o_proj.weight[:, 32:].flatten()])
    assert scores.kv_groups[1].item() == pytest.approx(group.double().norm().item(), rel=1e-12)
    channel = torch.cat([block.mlp.gate_proj.weight[7], block.mlp.up_proj.weight[7], block.mlp.down_proj.weight[:, 7]])
    assert scores.channels[7].item() == pytest.approx(channel.double().norm().item(), rel=1e-12)


def test_gradient_scores_are_the_first_order_taylor_terms_of_the_summed_gradient():
    model, batch = tiny_llama(), labelled_batch()
    scores = gradient_scores(model, [0], [batch, batch])[0]
    reference = tiny_llama()
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    from lorakit.models.supervised_loss import summed_loss
    (2 * summed_loss(reference.train(), batch) / tokens).backward()
    mlp = reference.model.layers[0].mlp
    expected = sum(((w.weight * w.weight.grad).abs()[3] if n != "down" else (w.weight * w.weight.grad).abs()[:, 3])
                   .double().sum() for n, w in (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)))
    assert scores.channels[3].item() == pytest.approx(expected.item(), rel=1e-4)
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())  # flags and grads restored


def test_random_scores_follow_the_seed():
    model = tiny_llama()
    assert torch.equal(random_scores(model, [0], 1)[0].channels, random_scores(model, [0], 1)[0].channels)
    assert not torch.equal(random_scores(model, [0], 1)[0].channels, random_scores(model, [0], 2)[0].channels)


def test_the_prune_map_round_trips_through_json_and_refuses_a_foreign_file():
    plan = _hand_map()
    assert PruneMap.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    with pytest.raises(lorakit.FormatError, match="not a LoRAM prune map"):
        PruneMap.from_json({"heads": 4})


def test_a_model_of_other_shapes_is_refused():
    with pytest.raises(ConfigError, match="the prune map was made for"):
        apply_pruning(tiny_llama(), _hand_map())


# --- lorakit train --loram-ratio, end to end ------------------------------------------------------------------

CONFIG = TrainConfig(steps=4, batch_size=4, lr=1e-2, seed=3, save_every=2)
LORA = LoraConfig(rank=4, alpha=8, targets="all-linear")
EVERY_BLOCK = dict(keep_first=0, keep_last=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "copy.jsonl"
    save_jsonl(path, copy_examples(16))
    return path


def _train(base_dir, data, out, loram: LoramConfig | None, **kwargs):
    return finetune(str(data), out, base=str(base_dir), lora=LORA, config=CONFIG, progress=False,
                    loram=loram or LoramConfig(), **kwargs)


def test_a_zero_ratio_run_writes_exactly_the_plain_adapter(base_dir, data, tmp_path):
    _train(base_dir, data, tmp_path / "plain", None)
    _train(base_dir, data, tmp_path / "loram0", LoramConfig(ratio=0.0, **EVERY_BLOCK))
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    loram = load_file(str(tmp_path / "loram0" / "adapter_model.safetensors"))
    assert plain.keys() == loram.keys() and all(torch.equal(plain[k], loram[k]) for k in plain)


def test_a_loram_run_writes_a_full_size_adapter_that_loads_in_lorakit_and_peft(base_dir, data, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "loram"
    _train(base_dir, data, out, LoramConfig(ratio=0.5, **EVERY_BLOCK))
    record = json.loads((out / "loram.json").read_text())
    assert record["parameters_pruned"] < record["parameters_full"] and len(record["blocks"]) == 2
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors[PREFIX + "mlp.gate_proj.lora_B.weight"].shape == (128, 4)
    assert tensors[PREFIX + "self_attn.o_proj.lora_A.weight"].shape == (4, 64)
    kept = record["blocks"]["0"]["channels"]
    pruned_rows = sorted(set(range(128)) - set(kept))
    assert len(pruned_rows) == 64 and not tensors[PREFIX + "mlp.gate_proj.lora_B.weight"][pruned_rows].any()
    assert tensors[PREFIX + "mlp.gate_proj.lora_B.weight"][kept].abs().sum() > 0  # trained
    loaded = lorakit.load(out)  # the full base it records
    batch = labelled_batch()
    ours = loaded.model(input_ids=batch["input_ids"]).logits
    full = lorakit.load_model(str(base_dir))[0]
    theirs = peft.PeftModel.from_pretrained(full, str(out)).eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    base_logits = lorakit.load_model(str(base_dir))[0](input_ids=batch["input_ids"]).logits
    assert not torch.allclose(ours, base_logits, atol=1e-4)  # the adapter changes the full model


def test_an_aligned_gradient_ranked_run_resumes_to_the_same_adapter(base_dir, data, tmp_path, monkeypatch):
    loram = LoramConfig(ratio=0.5, align_steps=2, importance="gradient", importance_batches=2, **EVERY_BLOCK)
    _train(base_dir, data, tmp_path / "straight", loram)
    record = json.loads((tmp_path / "straight" / "loram.json").read_text())
    assert len(record["alignment_losses"]) == 2 and all(loss > 0 for loss in record["alignment_losses"])
    run_interrupted(monkeypatch, 3, lambda: _train(base_dir, data, tmp_path / "resumed", loram))
    resume_finetune(tmp_path / "resumed", progress=False)
    straight = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_qloram_trains_on_the_pruned_base_in_nf4_and_the_adapter_records_it(base_dir, data, tmp_path):
    out = tmp_path / "qloram"
    _train(base_dir, data, out, LoramConfig(ratio=0.5, importance="magnitude", **EVERY_BLOCK), quantize="nf4")
    assert json.loads((out / "lorakit.json").read_text())["base_quantization"] == "nf4"
    assert load_file(str(out / "adapter_model.safetensors"))[PREFIX + "mlp.up_proj.lora_B.weight"].shape == (128, 4)


@pytest.mark.parametrize(("flags", "message"), [
    (["--full"], "--full trains every weight"),
    (["--method", "l4q"], "--method l4q is not one of"),
    (["--init", "lora-ga"], "--init lora-ga changes the base weights"),
    (["--loram-ratio", "1.5"], "loram ratio=1.5 is invalid"),
])
def test_what_loram_cannot_do_is_refused_before_anything_is_written(base_dir, data, tmp_path, capsys, flags,
                                                                        message):
    ratio = [] if "--loram-ratio" in flags else ["--loram-ratio", "0.5"]
    code = main(["train", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "2",
                 *ratio, *flags, "--quiet"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_cli_trains_loram_and_reports_the_pruned_model(base_dir, data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--base", str(base_dir), "--data", str(data), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--loram-ratio", "0.5", "--loram-importance", "magnitude",
                 "--loram-keep-first", "1", "--loram-keep-last", "0", "--quiet"]) == 0
    record = json.loads((out / "loram.json").read_text())
    assert list(record["blocks"]) == ["1"] and record["importance"] == "magnitude"
    assert json.loads((out / "run.json").read_text())["loram"]["ratio"] == 0.5
