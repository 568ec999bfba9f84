"""load_model on local directories, unknown names and the default name (with a fake conversion)."""

from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import LlamaForCausalLM

from lorakit.errors import ModelError
from lorakit.models import DEFAULT_MODEL, load_model, smollm2


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 33, 127]])).logits


def test_local_directory_round_trip(tiny_model_dir: Path) -> None:
    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    model, tokenizer = load_model(str(tiny_model_dir))
    assert not model.training
    assert model.dtype == torch.float32
    assert torch.equal(_logits(model), _logits(reference))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_local_directory_as_path_with_dtype_and_device(tiny_model_dir: Path) -> None:
    model, _ = load_model(tiny_model_dir, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"


def test_default_name_is_case_insensitive(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_saver: Callable[[Path], None]
) -> None:
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: Path("fake.gguf"))
    monkeypatch.setattr(smollm2, "convert", lambda gguf, out: tiny_saver(out))
    assert DEFAULT_MODEL == "smollm2-135m"
    for name in ("smollm2-135m", "SmolLM2-135M", "SmolLM2-135M-Instruct"):
        model, _ = load_model(name)
        assert model.config.vocab_size == 128


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "not a model!"])
def test_unknown_name_or_path(name: str) -> None:
    with pytest.raises(ModelError, match=r"not a local directory|no model directory"):
        load_model(name)


def test_unknown_hub_id_names_it_and_suggests_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network
    with pytest.raises(ModelError, match=r"'no-such-org/no-such-model'.*local model directory"):
        load_model("no-such-org/no-such-model")


def test_file_instead_of_directory(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="is a file"):
        load_model(tiny_model_dir / "config.json")


def test_directory_without_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    LlamaForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelError, match="cannot load a model and tokenizer from"):
        load_model(tmp_path / "bare")


def test_pickled_weights_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    directory = tmp_path / "pickled"
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(ModelError, match="cannot load a model and tokenizer from"):
        load_model(directory)
