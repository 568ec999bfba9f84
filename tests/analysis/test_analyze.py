"""``analyze`` / ``mitigate_intruders`` / ``lorakit analyze`` on a tiny Llama: the report and its schema,
adapters and full weight sets, overlap, mitigation (identity at λ = 1, exact scaling, PEFT loads it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import ConfigError, FormatError, LoraConfig
from lorakit.analysis import IntruderSettings, analyze, load_report, mitigate_intruders, write_report
from lorakit.analysis.report_files import REPORT_FILES
from lorakit.analysis.report_schema import check_report
from lorakit.analysis.subjects import base_weight
from lorakit.cli.main import main
from lorakit.io.factors import read_adapter_factors
from tests.helpers import char_tokenizer, logits, perturb, tiny_llama, token_batch

CONFIG = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "embed_tokens"))
Q0 = "model.layers.0.self_attn.q_proj"


def saved_adapter(path, seed: int = 0, config: LoraConfig = CONFIG, std: float = 0.2):
    model = tiny_llama()
    lorakit.attach(model, config, "a")
    perturb(model, "a", seed=seed, std=std)
    lorakit.save_adapter(model, path, "a")
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return saved_adapter(tmp_path_factory.mktemp("adapter") / "a")


def merged_weight(path, module: str) -> torch.Tensor:
    """W_0 + s B A of ``module`` for the adapter at ``path`` on the tiny Llama (float64)."""
    pair = read_adapter_factors(path).modules[module]
    return base_weight(tiny_llama(), module).double() + pair.delta()


def test_the_report_covers_every_linear_module_skips_the_embedding_and_fits_the_schema(adapter):
    report = analyze(adapter, base=tiny_llama(), progress=False)
    check_report(report)
    assert [m["module"] for m in report["modules"]] == [f"model.layers.{i}.{name}" for i in (0, 1) for name in
                                                        ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert [s["module"] for s in report["skipped"]] == ["model.embed_tokens"]
    q0 = report["modules"][0]
    expected = torch.linalg.svdvals(read_adapter_factors(adapter).modules[Q0].delta())
    assert q0["singular_values"] == pytest.approx(expected[:4].tolist()) and q0["rank"] == 4
    assert report["totals"]["intruders"] == sum(m["intruders"] for m in report["modules"]) > 0
    by_epsilon = [row["intruders"] for row in report["totals"]["intruders_by_epsilon"]]
    assert by_epsilon == sorted(by_epsilon)


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.pop("totals"), "report lacks totals"),
    (lambda r: r["modules"][0].update(rank="4"), "report.modules[0].rank is '4'"),
    (lambda r: r.update(schema="other/1"), "'lorakit.analysis/1' is required"),
])
def test_a_report_that_does_not_fit_the_schema_is_refused_naming_the_place(adapter, damage, message):
    report = analyze(adapter, base=tiny_llama(), progress=False)
    damage(report)
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_report(report)


def test_an_adapter_against_itself_overlaps_fully_and_against_another_less(adapter, tmp_path):
    itself = analyze(adapter, base=tiny_llama(), against=adapter, progress=False)["against"]
    assert itself["mean_left"] == pytest.approx(1.0) and itself["mean_right"] == pytest.approx(1.0)
    assert itself["rank"] == 4
    other = saved_adapter(tmp_path / "b", seed=7)
    different = analyze(adapter, base=tiny_llama(), against=other, progress=False)["against"]
    assert 0.0 < different["mean_left"] < 0.9


def test_a_full_weight_set_is_analysed_as_dense_differences_and_unchanged_layers_are_skipped(tmp_path):
    tuned = tiny_llama()
    with torch.no_grad():
        tuned.get_submodule(Q0).weight.add_(0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(2)))
    tuned.save_pretrained(tmp_path / "full")
    char_tokenizer().save_pretrained(tmp_path / "full")
    report = analyze(tmp_path / "full", base=tiny_llama(), progress=False)
    assert report["subject"]["kind"] == "weights"
    assert [m["module"] for m in report["modules"]] == [Q0]
    assert len(report["skipped"]) == 13 and {s["reason"] for s in report["skipped"]} == {"unchanged"}
    before, after = tiny_llama().get_submodule(Q0).weight.detach(), tuned.get_submodule(Q0).weight.detach()
    expected = (after.double() - before.double()).norm()
    assert report["modules"][0]["norm"] == pytest.approx(float(expected), rel=1e-6)


def test_mitigation_with_lambda_one_is_the_identity(adapter, tmp_path):
    result = mitigate_intruders(adapter, tmp_path / "same", base=tiny_llama(), scale=1.0, progress=False)
    assert result.total == 0
    before, after = read_adapter_factors(adapter), read_adapter_factors(tmp_path / "same")
    for module, pair in before.modules.items():
        assert torch.allclose(after.modules[module].delta(), pair.delta(), atol=1e-6)


def test_mitigation_scales_exactly_the_intruder_singular_values_and_peft_loads_the_result(adapter, tmp_path):
    settings = IntruderSettings(top_k=10, epsilon=0.5)
    result = mitigate_intruders(adapter, tmp_path / "m", base=tiny_llama(), scale=0.5, intruders=settings,
                                progress=False)
    assert result.scaled[Q0] > 0
    before = torch.linalg.svdvals(merged_weight(adapter, Q0))
    after = torch.linalg.svdvals(merged_weight(tmp_path / "m", Q0))
    report = analyze(adapter, base=tiny_llama(), intruders=settings, progress=False)
    intruders = [j for j, c in enumerate(report["modules"][0]["max_cosines"]) if c < 0.5]
    expected = before.clone()
    expected[intruders] *= 0.5
    assert torch.allclose(after, expected.sort(descending=True).values, atol=1e-4)
    assert read_adapter_factors(tmp_path / "m").modules[Q0].A.shape[0] == 4 + len(intruders)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "m").eval()
    ours = tiny_llama()
    lorakit.load_adapter(ours, tmp_path / "m")
    ids = token_batch()
    assert torch.allclose(logits(theirs, ids), logits(ours, ids), atol=1e-5)


def test_mitigation_never_writes_over_the_adapter_or_a_non_empty_directory(adapter, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for out in (adapter, tmp_path / "full"):
        with pytest.raises(ConfigError, match="not empty"):
            mitigate_intruders(adapter, out, base=tiny_llama(), progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_the_cli_writes_the_report_files_and_the_mitigated_adapter(adapter, base_dir, tmp_path, capsys):
    main(["analyze", str(adapter), "--base", str(base_dir), "--out", str(tmp_path / "report"), "--quiet",
          "--against", str(adapter), "--mitigate", "0.75", "--mitigated-out", str(tmp_path / "m")])
    printed = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES)
    report = load_report(tmp_path / "report")
    assert printed["intruders"] == report["totals"]["intruders"] > 0
    assert printed["overlap"]["mean_left"] == pytest.approx(1.0)
    assert printed["mitigated"]["directions_scaled"] > 0
    assert printed["mitigated"]["intruders_after"] <= printed["intruders"]
    assert "| q_proj | 2 |" in (tmp_path / "report" / "report.md").read_text()


def test_write_report_round_trips(adapter, tmp_path):
    report = analyze(adapter, base=tiny_llama(), progress=False)
    write_report(report, tmp_path / "r")
    assert load_report(tmp_path / "r") == json.loads(json.dumps(report))


def test_mitigation_takes_an_adapter_and_refuses_another_kind_by_name(tmp_path):
    release = Path(__file__).parent.parent / "fixtures" / "release-0.1.0"
    with pytest.raises(ConfigError, match="holds a MixLoRA .*takes an adapter directory"):
        mitigate_intruders(release / "mixlora", tmp_path / "m", base=tiny_llama(), progress=False)
    assert not (tmp_path / "m").exists()
