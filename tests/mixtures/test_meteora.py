"""MeteoRA on the core layer: per-linear gates, sparse vs dense routing, the task loss, saving, generation."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterError, ConfigError, FormatError, LoraConfig
from lorakit.core.records import recording
from lorakit.core.state import lora_layers
from lorakit.errors import DataError
from lorakit.mixtures.meteora import (
    MeteoraModel,
    MeteoraTaskLoss,
    load_meteora,
    save_meteora,
    saved_adapters,
)
from lorakit.mixtures.meteora.config import MeteoraConfig
from lorakit.mixtures.meteora.model import GATE_LOGITS, gate_key
from tests.helpers import logits, perturb, tiny_llama, token_batch

MIXED = {"maths": LoraConfig(rank=4, alpha=8, targets="all-linear"),
         "style": LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj")),
         "facts": LoraConfig(rank=3, alpha=3, targets=("down_proj", "q_proj"))}
FULL = {name: LoraConfig(rank=rank, alpha=2 * rank, targets="all-linear")
        for name, rank in (("maths", 4), ("style", 2), ("facts", 3))}


def with_adapters(configs=MIXED):
    model = tiny_llama()
    for index, (name, config) in enumerate(configs.items()):
        lorakit.attach(model, config, name, activate=False)
        perturb(model, name, seed=index + 1)
    return model


def meteora(config: MeteoraConfig = MeteoraConfig(gate_init_range=0.5), configs=MIXED, seed: int = 0):
    model = with_adapters(configs)
    torch.manual_seed(seed)
    return MeteoraModel(model, list(configs), config).eval()


def gated_forward(xmodel: MeteoraModel, *args, **kwargs):
    """The forward's output and the gate logits it recorded, by layer path."""
    with recording() as records:
        out = xmodel(*args, **kwargs)
    return out, xmodel.gate_logits(records)


def as_outputs(gates: dict[str, torch.Tensor]) -> SimpleNamespace:
    """Outputs carrying these gate logits as their forward's records, for the task loss."""
    return SimpleNamespace(records={GATE_LOGITS: [(gate_key(path), z) for path, z in gates.items()]})


def selections(gates: dict[str, torch.Tensor]) -> set[int]:
    """Which adapters won the top-1 anywhere in one forward."""
    return {int(i) for z in gates.values() for i in z.argmax(-1).unique()}


# --- configuration and construction -------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("top_k", 0), ("top_k", 1.5), ("temperature", 0.0),
                                          ("temperature", float("nan")), ("task_loss_weight", -1.0),
                                          ("gate_init_range", -0.1), ("train_adapters", "yes")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        MeteoraConfig(**{field: value})


def test_unknown_adapter_names_are_refused_by_name():
    model = with_adapters()
    with pytest.raises(AdapterError, match="nope"):
        MeteoraModel(model, ["maths", "nope"])


def test_one_gate_per_adapted_linear_with_the_adapters_frozen():
    xmodel = meteora()
    adapted = [name for name, layer in lora_layers(xmodel.model) if layer.adapters]
    assert xmodel.layer_names == adapted and len(adapted) == 2 * 7
    for name in adapted:
        gate = xmodel.gates[gate_key(name)]
        assert gate.weight.shape == (3, xmodel.model.get_submodule(name).base_layer.in_features)
        assert gate.weight.requires_grad and gate.bias is None
    assert all(not p.requires_grad for p in xmodel.model.parameters())
    trained = MeteoraModel(with_adapters(), list(MIXED), MeteoraConfig(train_adapters=True))
    assert all(p.requires_grad for _, layer in lora_layers(trained.model) for p in layer.adapters.parameters())


# --- a. the sparse path equals the dense reference ----------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sparse_path_equals_dense_path(temperature):
    xmodel = meteora(MeteoraConfig(gate_init_range=0.5, temperature=temperature))
    ids = token_batch(rows=3, length=7)
    base = logits(xmodel.model, ids)
    with torch.no_grad():
        out, gates = gated_forward(xmodel, ids)
        sparse = out.logits
        assert len(selections(gates)) == 3  # every adapter wins somewhere: the routing is not trivial
        dense = xmodel(ids, dense=True).logits
    assert not torch.allclose(sparse, base, atol=1e-3)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)


def test_masked_gates_never_select_an_adapter_the_layer_lacks():
    xmodel = meteora(MeteoraConfig(gate_init_range=0.5, top_k=2))
    with torch.no_grad():
        _, gates = gated_forward(xmodel, token_batch())
    o_proj = "model.layers.0.self_attn.o_proj"  # holds only "maths"
    assert xmodel.held(o_proj).tolist() == [True, False, False]
    z = gates[o_proj]
    assert torch.isinf(z[..., 1:]).all() and torch.isfinite(z[..., 0]).all()


# --- b. a one-hot gate is the plain single adapter ----------------------------------------------

@pytest.mark.parametrize("winner", ["maths", "style", "facts"])
def test_one_hot_gate_equals_the_single_adapter(winner):
    xmodel = meteora(MeteoraConfig(top_k=1), configs=FULL)
    model, j = xmodel.model, list(FULL).index(winner)
    ids = token_batch(rows=2, length=6)
    inputs = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, args, _out, name=name: inputs.__setitem__(name, args[0].detach())) for name in xmodel.layer_names]
    with lorakit.active(model, winner):
        expected = logits(model, ids)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():  # gate rows: winner's logit is 10 on every token the plain run shows this layer
        for name in xmodel.layer_names:
            x = inputs[name].reshape(-1, inputs[name].shape[-1]).double()
            row = torch.linalg.lstsq(x, torch.full((x.shape[0], 1), 10.0, dtype=torch.float64)).solution[:, 0]
            weight = xmodel.gates[gate_key(name)].weight
            weight.zero_()
            weight[j] = row.float()
        out, gates = gated_forward(xmodel, ids)
        routed = out.logits
    assert selections(gates) == {j}
    assert not torch.allclose(expected, logits(model, ids), atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=0)


# --- c. the task loss by hand -------------------------------------------------------------------

def hand_task_loss(xmodel: MeteoraModel, gates, tasks, mask) -> float:
    total, count = 0.0, 0
    for z in gates.values():
        for row, task in enumerate(tasks):
            if task is None:
                continue
            target = xmodel.names.index(task)
            for t in range(z.shape[1]):
                if mask[row][t] == 0 or math.isinf(z[row, t, target].item()):
                    continue
                finite = [v for v in z[row, t].tolist() if not math.isinf(v)]
                total += -(z[row, t, target].item() - math.log(sum(math.exp(v) for v in finite)))
                count += 1
    return total / count


def task_term(extension: MeteoraTaskLoss, batch: dict, outputs) -> torch.Tensor:
    return extension.losses(batch, outputs)["meteora_task"]


def test_task_loss_equals_a_hand_computation():
    xmodel = meteora(MeteoraConfig(gate_init_range=0.5, task_loss_weight=3.0))
    ids = token_batch(rows=3, length=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    tasks = ["maths", None, "facts"]
    seen = {}
    q = "model.layers.1.self_attn.q_proj"
    hook = xmodel.model.get_submodule(q).register_forward_hook(lambda _m, a, _o: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        out, gates = gated_forward(xmodel, ids, attention_mask=mask)
    hook.remove()
    recorded = as_outputs(gates)
    # the recorded logits are that layer's gate applied to that layer's own input
    torch.testing.assert_close(gates[q], seen["x"].float() @ xmodel.gates[gate_key(q)].weight.T)
    extension = MeteoraTaskLoss(xmodel)
    batch = {"input_ids": ids, "attention_mask": mask, "task_per_row": tasks}
    loss = task_term(extension, batch, recorded)
    assert loss.item() == pytest.approx(3.0 * hand_task_loss(xmodel, gates, tasks, mask.tolist()), rel=1e-5)
    full = task_term(extension, {**batch, "attention_mask": torch.ones_like(mask)}, recorded)
    assert full.item() != pytest.approx(loss.item(), rel=1e-4)  # padding really is left out
    labelled_all = task_term(extension, {**batch, "task_per_row": ["maths", "style", "facts"]}, recorded)
    assert labelled_all.item() != pytest.approx(loss.item(), rel=1e-4)  # the None row really is left out
    assert extension.losses({**batch, "task_per_row": [None, None, None]}, recorded) == {}
    with pytest.raises(DataError, match="cooking"):
        task_term(extension, {**batch, "task_per_row": ["cooking", None, None]}, recorded)
    renamed = MeteoraTaskLoss(xmodel, {"algebra": "maths", "trivia": "facts"})
    assert task_term(renamed, {**batch, "task_per_row": ["algebra", None, "trivia"]}, recorded).item() == \
        pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(AdapterError, match="poetry"):
        MeteoraTaskLoss(xmodel, {"x": "poetry"})


# --- d. training the gates alone ----------------------------------------------------------------

def gate_accuracy(gates: dict[str, torch.Tensor], targets: torch.Tensor) -> float:
    right = total = 0
    for z in gates.values():
        reachable = torch.isfinite(z.gather(-1, targets[:, None, None].expand(*z.shape[:2], 1))).squeeze(-1)
        hits = (z.argmax(-1) == targets[:, None]) & reachable
        right, total = right + int(hits.sum()), total + int(reachable.sum())
    return right / total


def test_training_the_gates_routes_labelled_rows_to_their_adapter():
    xmodel = meteora(MeteoraConfig(gate_init_range=0.02))
    frozen = {k: v.clone() for k, v in xmodel.model.state_dict().items()}
    # distinct tokens: at the first layer a gate sees only the token, so a token shared by rows of
    # different tasks could not be routed to both
    ids = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:24].reshape(4, 6)
    tasks = ["maths", "style", "facts", "maths"]
    targets = torch.tensor([xmodel.names.index(t) for t in tasks])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "task_per_row": tasks}
    extension = MeteoraTaskLoss(xmodel)
    optimizer = torch.optim.Adam([p for p in xmodel.parameters() if p.requires_grad], lr=0.05)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in xmodel.gates.parameters()}
    with torch.no_grad():
        _, gates = gated_forward(xmodel, ids)
    assert gate_accuracy(gates, targets) < 0.9
    for _ in range(100):
        out, gates = gated_forward(xmodel, ids)
        loss = task_term(extension, batch, as_outputs(gates))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, gates = gated_forward(xmodel, ids)
    assert gate_accuracy(gates, targets) >= 0.98  # 1.0 on most CPUs; 107 of 108 rows on some
    for key, value in xmodel.model.state_dict().items():
        assert torch.equal(value, frozen[key]), key


# --- e. saving and loading ----------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_logits(tmp_path):
    xmodel = meteora(MeteoraConfig(gate_init_range=0.5, temperature=0.7))
    ids = token_batch()
    with torch.no_grad():
        expected = xmodel(ids).logits
    save_meteora(xmodel, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "meteora_config.json").read_text())
    assert saved["adapters"] == list(MIXED) and saved["layer_names"] == xmodel.layer_names
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["gates.safetensors", "lorakit.json",
                                                                  "meteora_config.json"]
    assert saved_adapters(tmp_path / "m") == list(MIXED)
    loaded = load_meteora(with_adapters(), tmp_path / "m").eval()
    assert loaded.config == xmodel.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, dict(model.__dict__))


def assert_unchanged(model, before):
    state, grads, attributes = before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.__dict__.keys() == attributes.keys()


def test_load_refuses_bad_gates_and_missing_adapters_changing_nothing(tmp_path):
    xmodel = meteora()
    save_meteora(xmodel, tmp_path / "m")
    gates_file = tmp_path / "m" / "gates.safetensors"
    good = load_file(gates_file)
    first = xmodel.layer_names[0]

    target = with_adapters()
    before = snapshot(target)
    save_file({**good, first: torch.zeros(3, 65)}, gates_file)
    with pytest.raises(FormatError, match="shape"):
        load_meteora(target, tmp_path / "m")
    assert_unchanged(target, before)
    save_file({**good, first: torch.full_like(good[first], float("nan"))}, gates_file)
    with pytest.raises(FormatError, match="finite"):
        load_meteora(target, tmp_path / "m")
    save_file({k: v for k, v in good.items() if k != first}, gates_file)
    with pytest.raises(FormatError, match="missing"):
        load_meteora(target, tmp_path / "m")
    assert_unchanged(target, before)

    save_file(good, gates_file)
    lacking = tiny_llama()
    lorakit.attach(lacking, MIXED["maths"], "maths", activate=False)
    before = snapshot(lacking)
    with pytest.raises(AdapterError, match="style"):
        load_meteora(lacking, tmp_path / "m")
    assert_unchanged(lacking, before)

    config_file = tmp_path / "m" / "meteora_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "meteora": {**saved["meteora"], "top_k": 0}}))
    before = snapshot(target)
    with pytest.raises(FormatError, match="top_k"):
        load_meteora(target, tmp_path / "m")
    assert_unchanged(target, before)


# --- f. generation with the KV cache ------------------------------------------------------------

def test_cached_greedy_generate_equals_step_by_step_recomputation():
    xmodel = meteora(MeteoraConfig(gate_init_range=0.5))
    prompt = token_batch(rows=2, length=5, seed=7)
    generated = xmodel.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                use_cache=True, pad_token_id=0, min_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            step = xmodel(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
    assert torch.equal(generated, ids)
    plain = xmodel.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                  do_sample=False, pad_token_id=0, min_new_tokens=6)
    assert not torch.equal(plain, generated)  # the routing really applied during generate
