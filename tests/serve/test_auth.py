"""API keys: loading, constant-time comparison, which paths are public."""

from __future__ import annotations

import pytest

from rapidlm.errors import ConfigError
from rapidlm.serve.auth import bearer_token, is_public, key_matches, load_api_key


def test_load_api_key(tmp_path):
    (tmp_path / "k").write_text("  sk-abc\n")
    assert load_api_key(tmp_path / "k") == "sk-abc"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_api_key(tmp_path / "empty")
    (tmp_path / "two").write_text("a b\n")
    with pytest.raises(ConfigError, match="whitespace"):
        load_api_key(tmp_path / "two")
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_key(tmp_path / "missing")


def test_key_matches():
    assert key_matches("sk-abc", "sk-abc")
    assert not key_matches("sk-abd", "sk-abc")
    assert not key_matches("sk-ab", "sk-abc")
    assert not key_matches(None, "sk-abc")
    assert not key_matches("\udcff", "sk-abc")  # undecodable header bytes never crash the check


def test_bearer_token():
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer   sk-1 ") == "sk-1"
    assert bearer_token("Basic sk-1") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_public_paths():
    for p in ("/health", "/ready", "/metrics", "/", "/static/x.css"):
        assert is_public(p)
    for p in ("/v1/models", "/v1/completions", "/openapi.json", "/healthz", "/static"):
        assert not is_public(p)
