"""Combining adapters on disk: every mode against the dense reference ``Σ w_i s_i B_i A_i``, logits in
lorakit and PEFT, identity and negation, the svd error, what linear refuses, and what is never written."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import ConfigError, FormatError, LoraConfig
from lorakit.cli.combine_commands import adapter_argument
from lorakit.cli.main import main
from lorakit.combine import combine_adapters
from lorakit.core.state import lora_layers
from tests.helpers import TinyConvNet, logits, perturb, tiny_llama, token_batch

# Mixed ranks, rsLoRA, rank and alpha patterns, an embedding; modules overlap only on q_proj.
CONFIG_A = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"),
                      rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
CONFIG_B = LoraConfig(rank=3, alpha=5, use_rslora=True, targets=("q_proj", "o_proj", "down_proj"),
                      rank_pattern={"down_proj": 5})
WEIGHTS = (0.7, -1.3)
Q0 = "model.layers.0.self_attn.q_proj"


def save_source(path, config: LoraConfig, seed: int, model=None):
    model = tiny_llama() if model is None else model
    lorakit.attach(model, config, "source")
    perturb(model, "source", seed=seed)
    lorakit.save_adapter(model, path, "source")
    return path


def with_adapters(*paths, make=tiny_llama):
    """A fresh model with the adapters at ``paths`` loaded as "s0", "s1", ..."""
    model = make()
    for index, path in enumerate(paths):
        lorakit.load_adapter(model, path, f"s{index}")
    return model


def deltas(model, name: str) -> dict[str, torch.Tensor]:
    """Each module's ``s B A`` in the base weight's layout, computed by the live layers (float64)."""
    found = {}
    for module, layer in lora_layers(model):
        if name in layer.adapters:
            A, B, scale = layer.adapters[name].factors()
            found[module] = scale * layer.kind.delta_weight(A.detach().double(), B.detach().double())
    return found


def reference(paths, weights, make=tiny_llama) -> dict[str, torch.Tensor]:
    """``Σ_i w_i s_i B_i A_i`` per module over the union of modules."""
    model = with_adapters(*paths, make=make)
    total: dict[str, torch.Tensor] = {}
    for index, weight in enumerate(weights):
        for module, delta in deltas(model, f"s{index}").items():
            total[module] = total.get(module, 0) + weight * delta
    return total


def combined_deltas(path, make=tiny_llama) -> dict[str, torch.Tensor]:
    return deltas(with_adapters(path, make=make), "s0")


def assert_same_deltas(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=atol, rtol=1e-5, msg=module)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return save_source(root / "a", CONFIG_A, seed=1), save_source(root / "b", CONFIG_B, seed=2)


@pytest.fixture(scope="module", params=["A", "B"])
def sharing(request, tmp_path_factory):
    """Two adapters with different scales (alpha, rsLoRA, an alpha pattern) that share one factor."""
    root = tmp_path_factory.mktemp(f"shared-{request.param}")
    model = tiny_llama()
    first = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), alpha_pattern={"v_proj": 2})
    second = LoraConfig(rank=4, alpha=6, use_rslora=True, targets=("q_proj", "v_proj"))
    lorakit.attach(model, first, "p")
    lorakit.attach(model, second, "q")
    perturb(model, "p", seed=3)
    perturb(model, "q", seed=4)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            shared = getattr(layer.adapters["p"], request.param)
            getattr(layer.adapters["q"], request.param).copy_(shared)
    return lorakit.save_adapter(model, root / "p", "p"), lorakit.save_adapter(model, root / "q", "q")


@pytest.mark.parametrize("mode, rank", [("cat", None), ("svd", 16)])
def test_cat_and_full_rank_svd_equal_the_weighted_sum_per_module(sources, tmp_path, mode, rank):
    report = combine_adapters(list(zip(sources, WEIGHTS, strict=True)), tmp_path / "c", mode=mode, rank=rank)
    want = reference(sources, WEIGHTS)
    assert_same_deltas(combined_deltas(tmp_path / "c"), want)
    assert len(want) == 2 * 4 + 1  # the union: q, v, o, down on both layers, and the embedding
    # cat: ranks add where both adapters have the module; svd: no more than the delta can have.
    assert report.ranks[Q0] == 4 + 3 and report.ranks["model.layers.1.self_attn.q_proj"] == 2 + 3
    assert report.ranks["model.layers.0.mlp.down_proj"] == 5 and report.ranks["model.embed_tokens"] == 4
    assert report.relative_error < 1e-12


def test_linear_sums_the_other_factor_exactly_when_one_is_shared(sharing, tmp_path):
    report = combine_adapters(list(zip(sharing, WEIGHTS, strict=True)), tmp_path / "c", mode="linear")
    assert_same_deltas(combined_deltas(tmp_path / "c"), reference(sharing, WEIGHTS))
    assert report.ranks[Q0] == 4
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config == json.loads((sharing[0] / "adapter_config.json").read_text())  # the first adapter's scale


@pytest.mark.parametrize("mode, rank", [("cat", None), ("svd", 16)])
def test_combined_logits_equal_the_weighted_active_sources_in_lorakit_and_peft(sources, tmp_path, mode, rank):
    ids = token_batch()
    combine_adapters(list(zip(sources, WEIGHTS, strict=True)), tmp_path / "c", mode=mode, rank=rank)
    model = with_adapters(*sources)
    lorakit.set_active(model, "s0", "s1", weights=list(WEIGHTS))
    want = logits(model, ids)
    assert not torch.allclose(want, logits(tiny_llama(), ids), atol=1e-3)
    torch.testing.assert_close(logits(with_adapters(tmp_path / "c"), ids), want, atol=1e-5, rtol=1e-5)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "c").eval()
    torch.testing.assert_close(logits(theirs, ids), want, atol=1e-5, rtol=1e-5)


def test_linear_logits_equal_the_weighted_active_sources(sharing, tmp_path):
    ids = token_batch()
    combine_adapters(list(zip(sharing, WEIGHTS, strict=True)), tmp_path / "c", mode="linear")
    model = with_adapters(*sharing)
    lorakit.set_active(model, "s0", "s1", weights=list(WEIGHTS))
    torch.testing.assert_close(logits(with_adapters(tmp_path / "c"), ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_linear_with_weight_one_writes_the_adapter_back_unchanged(sources, tmp_path):
    combine_adapters([(sources[1], 1.0)], tmp_path / "c", mode="linear")
    original = load_file(sources[1] / "adapter_model.safetensors")
    combined = load_file(tmp_path / "c" / "adapter_model.safetensors")
    assert original.keys() == combined.keys()
    assert all(torch.equal(original[key], combined[key]) for key in original)
    assert (json.loads((tmp_path / "c" / "adapter_config.json").read_text())
            == json.loads((sources[1] / "adapter_config.json").read_text()))


@pytest.mark.parametrize("mode, rank", [("cat", None), ("svd", 5)])
def test_one_adapter_with_weight_one_gives_its_logits(sources, tmp_path, mode, rank):
    ids = token_batch()
    combine_adapters([(sources[1], 1.0)], tmp_path / "c", mode=mode, rank=rank)
    torch.testing.assert_close(logits(with_adapters(tmp_path / "c"), ids), logits(with_adapters(sources[1]), ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, rank", [("cat", None), ("svd", 5), ("linear", None)])
def test_weight_minus_one_negates_and_a_repeated_path_adds(sources, tmp_path, mode, rank):
    combine_adapters([(sources[0], -1.0)], tmp_path / "neg", mode=mode, rank=rank)
    original = combined_deltas(sources[0])
    assert_same_deltas(combined_deltas(tmp_path / "neg"), {m: -delta for m, delta in original.items()})
    combine_adapters([(sources[0], 1.0), (sources[0], 0.5)], tmp_path / "twice", mode=mode, rank=rank)
    assert_same_deltas(combined_deltas(tmp_path / "twice"), {m: 1.5 * delta for m, delta in original.items()})


def test_svd_reports_the_error_of_the_truncation_it_wrote(sources, tmp_path):
    report = combine_adapters(list(zip(sources, WEIGHTS, strict=True)), tmp_path / "c", mode="svd", rank=2)
    want, got = reference(sources, WEIGHTS), combined_deltas(tmp_path / "c")
    assert set(report.ranks.values()) == {2}
    dropped = total = 0.0
    for module, delta in want.items():
        residual = float((delta - got[module]).norm())
        assert report.module_errors[module] == pytest.approx(residual / float(delta.norm()), rel=1e-4, abs=1e-6)
        # Eckart-Young: the written rank-2 delta is the best one, its error the tail of the singular values.
        values = torch.linalg.svdvals(delta)
        best = float(values[2:].norm() / values.norm())
        assert report.module_errors[module] == pytest.approx(best, rel=1e-6, abs=1e-12)
        dropped, total = dropped + residual ** 2, total + float(delta.norm()) ** 2
    assert report.relative_error == pytest.approx(math.sqrt(dropped / total), rel=1e-4)
    assert 0.05 < report.relative_error < 1  # rank 2 of up to 7 really loses something
    assert report.to_dict()["module_errors"] == report.module_errors


def test_linear_refuses_independent_adapters_with_the_reason(sources, tmp_path):
    other = save_source(tmp_path / "other", CONFIG_A, seed=9)
    with pytest.raises(ConfigError, match=r"not exact on module 'model\.embed_tokens'.*cross terms.*'cat'"):
        combine_adapters([(sources[0], 1.0), (other, 1.0)], tmp_path / "c", mode="linear")
    with pytest.raises(ConfigError, match=r"b has no adapter on module 'model\.embed_tokens'.*'cat'"):
        combine_adapters(list(zip(sources, WEIGHTS, strict=True)), tmp_path / "c", mode="linear")
    assert not (tmp_path / "c").exists()


def set_base(directory, name):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "base_model_name_or_path": name}))


def test_different_bases_are_refused_unless_allowed(sources, tmp_path):
    a, b = shutil.copytree(sources[0], tmp_path / "a"), shutil.copytree(sources[1], tmp_path / "b")
    set_base(b, "org/llama-b")  # the other one records none: nothing to compare
    combine_adapters([(a, 1.0), (b, 1.0)], tmp_path / "c1")
    assert json.loads((tmp_path / "c1" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/llama-b"
    set_base(a, "/models/LLAMA-B/")  # the same model by its last path part
    combine_adapters([(a, 1.0), (b, 1.0)], tmp_path / "c2")
    set_base(a, "org/llama-a")
    with pytest.raises(ConfigError, match=r"b/adapter_config\.json: base_model_name_or_path is 'org/llama-b'"):
        combine_adapters([(a, 1.0), (b, 1.0)], tmp_path / "c3")
    assert not (tmp_path / "c3").exists()
    combine_adapters([(a, 1.0), (b, 1.0)], tmp_path / "c3", allow_different_bases=True)


def test_a_module_with_other_base_shapes_is_refused(sources, tmp_path):
    other = shutil.copytree(sources[1], tmp_path / "other")
    tensors = load_file(other / "adapter_model.safetensors")
    tensors[f"base_model.model.{Q0}.lora_A.weight"] = torch.ones(3, 32)
    save_file(tensors, other / "adapter_model.safetensors")
    with pytest.raises(FormatError, match=rf"other: module '{Q0}' has A \(3, 32\).*different base models"):
        combine_adapters([(sources[0], 1.0), (other, 1.0)], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_non_empty_out_is_refused_and_left_alone_unless_overwrite(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty; pass overwrite=True"):
        combine_adapters([(sources[0], 1.0)], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    combine_adapters([(sources[0], 1.0)], out, overwrite=True)
    assert {p.name for p in out.iterdir()} == {"keep.txt", "adapter_config.json", "adapter_model.safetensors",
                                               "lorakit.json"}


@pytest.mark.parametrize("adapters, mode, rank, message", [
    ([], "cat", None, "non-empty list"),
    ([("A", float("nan"))], "cat", None, "a finite number"),
    ([("A", True)], "cat", None, "a finite number"),
    ([("A", 10 ** 400)], "cat", None, "a finite number"),
    ([("A", 1.0)], "svd", None, "needs a positive integer rank"),
    ([("A", 1.0)], "svd", 0, "needs a positive integer rank"),
    ([("A", 1.0)], "cat", 4, "applies to mode 'svd' only"),
    ([("A", 1.0)], "ties", None, r"one of \['cat', 'linear', 'svd'\]"),
    ([("A", 1e300)], "cat", None, "overflows float32"),
])
def test_bad_arguments_are_refused_and_nothing_is_written(sources, tmp_path, adapters, mode, rank, message):
    adapters = [(sources[0] if path == "A" else path, weight) for path, weight in adapters]
    with pytest.raises(ConfigError, match=message):
        combine_adapters(adapters, tmp_path / "c", mode=mode, rank=rank)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("mode, rank", [("cat", None), ("svd", 3)])
def test_conv2d_adapters_combine_exactly(tmp_path, mode, rank):
    first = save_source(tmp_path / "a", LoraConfig(rank=2, alpha=4, targets=("conv1", "conv2")), 1, TinyConvNet())
    second = save_source(tmp_path / "b", LoraConfig(rank=1, alpha=3, use_rslora=True, targets=("conv1",)), 2,
                         TinyConvNet())
    combine_adapters([(first, 0.5), (second, -2.0)], tmp_path / "c", mode=mode, rank=rank)
    want = reference([first, second], [0.5, -2.0], make=TinyConvNet)
    assert_same_deltas(combined_deltas(tmp_path / "c", make=TinyConvNet), want)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    model = with_adapters(first, second, make=TinyConvNet)
    lorakit.set_active(model, "s0", "s1", weights=[0.5, -2.0])
    with torch.no_grad():
        torch.testing.assert_close(with_adapters(tmp_path / "c", make=TinyConvNet)(x), model(x), atol=1e-5, rtol=1e-5)


def test_cli_combines_and_prints_the_report(sources, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["combine", "--adapter", str(sources[0]), "--adapter", f"{sources[1]}=-1.3", "--mode", "svd",
                 "--rank", "3", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "svd" and report["out"] == str(out) and report["ranks"][Q0] == 3
    assert [a["weight"] for a in report["adapters"]] == [1.0, -1.3] and 0 < report["relative_error"] < 1
    combine_adapters([(sources[0], 1.0), (sources[1], -1.3)], tmp_path / "api", mode="svd", rank=3)
    written = load_file(out / "adapter_model.safetensors")
    expected = load_file(tmp_path / "api" / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


def test_cli_errors_return_2_with_the_message(sources, tmp_path, capsys):
    args = ["combine", "--adapter", str(sources[0]), "--adapter", str(sources[1]), "--out", str(tmp_path / "c")]
    assert main([*args, "--mode", "linear"]) == 2
    assert "lorakit combine: error: mode 'linear': " in capsys.readouterr().err
    assert main([*args[:3], "--adapter", f"{sources[1]}=heavy", *args[5:]]) == 2
    assert "the weight after '=' must be a number" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_adapter_argument_reads_an_optional_weight_after_the_last_equals_sign():
    assert adapter_argument("runs/a") == ("runs/a", 1.0)
    assert adapter_argument("runs/a=-0.5") == ("runs/a", -0.5)
    assert adapter_argument("runs/lr=0.1=2") == ("runs/lr=0.1", 2.0)
    with pytest.raises(ConfigError, match="finite weight"):
        adapter_argument("runs/a=inf")
