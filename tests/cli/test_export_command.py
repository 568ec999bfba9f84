"""``lorakit export``: the merged model and the LoRA file written from an adapter directory, an existing file
refused without ``--force``, and ``--quant`` refused for the LoRA file (exit code 2, the reason on stderr)."""

from __future__ import annotations

import gguf
import pytest

import lorakit
from lorakit.cli.main import main
from tests.helpers import adapted, bpe_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A tiny Llama with the byte-level BPE tokenizer saved as a model directory, and an adapter trained on it."""
    root = tmp_path_factory.mktemp("export")
    tiny_llama().save_pretrained(root / "base")
    bpe_tokenizer().save_pretrained(root / "base")
    return root / "base", lorakit.save_adapter(adapted(tiny_llama), root / "adapter")


def test_export_writes_the_merged_model_and_refuses_to_overwrite_it(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    command = ["export", "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "m.gguf"), "--base", str(base),
               str(adapter)]
    assert main(command) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(command) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*command, "--force"]) == 0


def test_export_writes_the_lora_file_and_refuses_a_quantization_for_it(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    command = ["export", "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf"), "--base", str(base), str(adapter)]
    assert main(command) == 0
    assert gguf.GGUFReader(tmp_path / "a.gguf").fields["adapter.type"].contents() == "lora"
    assert main([*command, "--force", "--quant", "q4_0"]) == 2
    assert "--quant applies to --format gguf" in capsys.readouterr().err


def test_an_adapter_trained_on_quantized_bases_exports_merged_but_not_alone(base_and_adapter, tmp_path, capsys):
    from lorakit.quant.quantized_adapter import save_quantized_adapter
    from tests.quant.test_quantized_adapter import trained_on_quantized_bases
    base, _ = base_and_adapter
    model, quantized = trained_on_quantized_bases()
    directory = save_quantized_adapter(model, tmp_path / "quantized", quantized)
    merged = tmp_path / "gguf.gguf"  # the dequantized bases with the adapter merged: the model it was trained as
    assert main(["export", "--format", "gguf", "--out", str(merged), "--base", str(base), str(directory)]) == 0
    reader = gguf.GGUFReader(merged)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    layer = model.model.layers[0].self_attn.v_proj
    expected = layer.base_layer.weight + layer.delta_weight("default")
    assert abs(q.data.astype("float32") - expected.detach().numpy()).max() < 1e-2  # float16 in the file
    alone = tmp_path / "gguf-lora.gguf"
    assert main(["export", "--format", "gguf-lora", "--out", str(alone), "--base", str(base), str(directory)]) == 2
    assert "trained on quantized bases" in capsys.readouterr().err and not alone.exists()
