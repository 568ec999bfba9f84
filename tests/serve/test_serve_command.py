"""``lorakit serve`` refuses what it cannot serve before it serves anything: exit 2 and the reason."""

from __future__ import annotations

import pytest

from lorakit.cli.main import main


@pytest.mark.parametrize(("flags", "words"), [
    (["--host", "0.0.0.0"], "--insecure-public"),
    (["--allow-runtime-loading"], "--adapter-root"),
    (["--adapter-root", "/no/such/root"], "is not a directory"),
    (["--adapter", "no-name-here"], "is not NAME=DIR"),
    (["--adapter", "bad=/no/such/adapter"], "--adapter bad=/no/such/adapter: /no/such/adapter: no such directory"),
    (["--adapter", "empty=EMPTY"], "cannot be served"),
])
def test_a_command_that_cannot_serve_exits_2_with_the_reason(base_dir, tmp_path, capsys, monkeypatch, flags, words):
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    flags = [flag.replace("EMPTY", str(tmp_path)) for flag in flags]
    assert main(["serve", "--base", str(base_dir), "--port", "0", *flags]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("lorakit serve: error:") and words in error, error


def test_the_key_from_the_environment_allows_a_public_host(base_dir, monkeypatch, capsys):
    """With LORAKIT_API_KEY set, a public host passes the exposure check (the bad adapter stops it after)."""
    monkeypatch.setenv("LORAKIT_API_KEY", "from-the-environment")
    assert main(["serve", "--base", str(base_dir), "--host", "0.0.0.0", "--adapter", "bad=/no/such/adapter"]) == 2
    assert "no such directory" in capsys.readouterr().err
