"""`ray start` refuses to start under token auth without a token and does not create one; the demo and the
two-node cluster call :func:`ensure_auth_token` first, so a machine that never ran Ray works."""

from __future__ import annotations

import pytest

from cl_service.on_ray import local

pytestmark = pytest.mark.timeout(120)


def test_ensure_auth_token_creates_one_token_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    token = tmp_path / ".ray" / "auth_token"
    assert not token.exists()
    local.ensure_auth_token()
    first = token.read_text().strip()
    assert len(first) >= 16
    local.ensure_auth_token()  # an existing token is kept: nodes and clients already started keep working
    assert token.read_text().strip() == first


def test_no_token_is_made_when_auth_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    local.ensure_auth_token()
    assert not (tmp_path / ".ray").exists()
