"""build_atomically: readers see a missing or a complete directory, never a half-written one."""

from pathlib import Path

import pytest

from lorakit.models.atomic import build_atomically


def _write(directory: Path, text: str) -> None:
    (directory / "weights.txt").write_text(text)


def test_build_lands_complete_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"
    assert build_atomically(target, lambda d: _write(d, "ours")) == target
    assert (target / "weights.txt").read_text() == "ours"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_build_never_writes_into_target_directly(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build(directory: Path) -> None:
        assert directory != target and directory.parent == target.parent
        assert not target.exists()
        _write(directory, "ours")

    build_atomically(target, build)
    assert target.is_dir()


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build(directory: Path) -> None:
        _write(directory, "half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(target, build)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builder_wins_and_ours_is_discarded(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build(directory: Path) -> None:
        _write(directory, "ours")
        target.mkdir()  # Another process renamed its finished build into place meanwhile.
        _write(target, "theirs")

    assert build_atomically(target, build) == target
    assert (target / "weights.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
