"""Ray's token file, which ``ray.init`` writes world-readable, is left readable by its owner only."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from simreg.orchestrator.train.trainer import private_token_file


@pytest.mark.parametrize("by_env", [False, True])
def test_token_file_made_private(tmp_path: Path, monkeypatch, by_env: bool):
    token = tmp_path / ("token" if by_env else ".ray/auth_token")
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("abc")
    token.chmod(0o644)  # as Ray writes it under the usual umask
    monkeypatch.setenv("HOME", str(tmp_path))
    if by_env:
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    else:
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    private_token_file()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_no_token_file_is_fine(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    private_token_file()  # auth disabled: nothing to change, no error
    assert not (tmp_path / ".ray").exists()
