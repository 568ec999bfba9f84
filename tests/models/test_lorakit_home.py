"""lorakit_home: $LORAKIT_HOME, else ~/.cache/lorakit."""

from pathlib import Path

import pytest

from lorakit.models import lorakit_home


def test_home_honours_lorakit_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "elsewhere"))
    assert lorakit_home() == tmp_path / "elsewhere"


def test_home_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORAKIT_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lorakit_home() == tmp_path / ".cache" / "lorakit"


def test_home_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LORAKIT_HOME", "~/lk")
    assert lorakit_home() == tmp_path / "lk"
