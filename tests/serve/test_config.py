"""ServerConfig validates every field and names it."""

from __future__ import annotations

import pytest

from rapidlm.errors import ConfigError
from rapidlm.serve.config import ServerConfig


def test_defaults_bind_loopback():
    c = ServerConfig()
    assert c.host == "127.0.0.1" and c.api_key is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", ""),
        ("port", 70000),
        ("port", -1),
        ("port", True),
        ("api_key", " "),
        ("max_body_bytes", 10),
        ("drain_timeout", -1),
        ("drain_timeout", float("inf")),
        ("log_level", "loud"),
    ],
)
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=f"ServerConfig.{field}"):
        ServerConfig(**{field: value})
