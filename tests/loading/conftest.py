"""Directories of every kind, written by the current code (the same commands as the release fixtures)."""

from __future__ import annotations

import pytest

from tests.fixtures.make_release_fixtures import write_fixtures


@pytest.fixture(scope="session")
def written(tmp_path_factory):
    """``(root, name -> kind)``: ``root`` holds ``base/``, ``train.jsonl`` and one directory per kind of
    :data:`tests.fixtures.make_release_fixtures.COMMANDS`, each written by today's ``lorakit`` commands."""
    root = tmp_path_factory.mktemp("written")
    return root, write_fixtures(root)
