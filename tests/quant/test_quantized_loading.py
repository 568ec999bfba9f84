"""Bases quantized as they load (``--quantize nf4|int8``): the same model as quantizing the loaded fp32 model, read
back from the cache bit for bit, refused with a reason when the checkpoint or the cache is damaged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit import ConfigError, ModelError, TargetError
from lorakit.models.skeleton import causal_lm_skeleton, check_filled
from lorakit.quant import NFLinear, quantize_model
from lorakit.quant import quantized_loading as loading
from lorakit.quant.base_schemes import base_scheme
from lorakit.quant.model_quantization import quantizable_linears
from lorakit.quant.nf_config import QLORA_NF4
from tests.helpers import logits, tiny_llama, token_batch


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if ".layers." in name and (
            isinstance(module, (nn.Linear, NFLinear)) or type(module).__name__ == "Linear8bitLt")}


def test_nf4_on_load_is_the_loaded_model_quantized_afterwards(base_dir, home):
    model, tokenizer = loading.load_quantized_base(base_dir, "nf4")
    reference = tiny_llama()
    quantize_model(reference, QLORA_NF4)
    linears = _decoder_linears(model)
    assert len(linears) == 14 and all(isinstance(layer, NFLinear) for layer in linears.values())
    assert type(model.lm_head) is nn.Linear and not model.training and tokenizer is not None
    ids = token_batch()
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_the_second_load_reads_the_cache_bit_for_bit(base_dir, home, monkeypatch):
    first, _ = loading.load_quantized_base(base_dir, "nf4")
    assert len(list((home / "quantized").iterdir())) == 1

    def no_quantizing(*args, **kwargs):
        raise AssertionError("the cached base was quantized again")

    monkeypatch.setattr(loading, "fill_quantized", no_quantizing)
    second, _ = loading.load_quantized_base(base_dir, "nf4")
    ids = token_batch()
    assert torch.equal(logits(first, ids), logits(second, ids))


def test_a_damaged_cache_is_refused_saying_to_delete_it(base_dir, home):
    loading.load_quantized_base(base_dir, "nf4")
    cached = next((home / "quantized").iterdir())
    (cached / "linears.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="delete that directory"):
        loading.load_quantized_base(base_dir, "nf4")


def test_int8_uses_bitsandbytes_llm_int8_close_to_full_precision(base_dir, home):
    pytest.importorskip("bitsandbytes")
    model, _ = loading.load_quantized_base(base_dir, "int8")
    linears = _decoder_linears(model)
    assert len(linears) == 14 and all(type(layer).__name__ == "Linear8bitLt" for layer in linears.values())
    assert not (home / "quantized").exists()  # int8 is quantized on every load
    ids = token_batch()
    full = logits(tiny_llama(), ids)
    assert 0 < (logits(model, ids) - full).abs().max() < 0.05 * full.abs().max()


def test_an_unknown_scheme_is_refused_with_the_known_ones(base_dir, home):
    with pytest.raises(ConfigError, match="one of nf4, int8"):
        loading.load_quantized_base(base_dir, "nf3")


def _model_dir(base_dir, directory, state: dict[str, torch.Tensor]):
    """``base_dir``'s config and tokenizer with the weights ``state`` in ``directory``."""
    directory.mkdir()
    for item in base_dir.iterdir():
        if item.suffix != ".safetensors":
            (directory / item.name).write_bytes(item.read_bytes())
    save_file(state, directory / "model.safetensors")
    return directory


def test_an_incomplete_checkpoint_names_what_is_missing(base_dir, home, tmp_path):
    state = {k: v for k, v in tiny_llama().state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ModelError, match=r"layers\.1\.mlp\.up_proj"):
        loading.load_quantized_base(_model_dir(base_dir, tmp_path / "broken", state), "nf4")


def test_a_checkpoint_of_another_shape_is_refused(base_dir, home, tmp_path):
    state = {**tiny_llama().state_dict(), "model.norm.weight": torch.ones(32)}
    with pytest.raises(ModelError, match=r"model\.norm\.weight.*\(32,\).*\(64,\)"):
        loading.load_quantized_base(_model_dir(base_dir, tmp_path / "other", state), "nf4")


def test_quantizing_an_unsupported_layer_type_names_it():
    with pytest.raises(TargetError, match="'model.embed_tokens' is a Embedding"):
        quantizable_linears(tiny_llama(), ("embed_tokens",))


def test_a_skeleton_left_unfilled_is_refused_by_name():
    model = causal_lm_skeleton(tiny_llama().config)
    assert all(param.device.type == "meta" for param in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers stay real
    with pytest.raises(ModelError, match="lacks"):
        check_filled(model)


def test_the_int8_scheme_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match="pip install 'bitsandbytes"):
        base_scheme("int8").quantize(torch.randn(4, 8), None)


def test_adapters_record_the_quantization_and_load_onto_it(base_dir, home, tmp_path):
    model, _ = loading.load_quantized_base(base_dir, "nf4")
    lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    from tests.helpers import perturb
    perturb(model, "default")
    lorakit.save_adapter(model, tmp_path / "qlora")
    assert '"base_quantization": "nf4"' in (tmp_path / "qlora" / "lorakit.json").read_text()

    loaded = lorakit.load(tmp_path / "qlora")  # no model: the recorded base, quantized as recorded
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj.base_layer, NFLinear)
    ids = token_batch()
    assert torch.equal(logits(loaded.model, ids), logits(model, ids))
    with pytest.warns(UserWarning, match="trained on a nf4-quantized base and is loaded onto a full-precision one"):
        lorakit.load(tmp_path / "qlora", tiny_llama())
