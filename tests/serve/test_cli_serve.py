"""`rapidlm serve` checks its settings before loading the model: mistakes fail fast, exit 2, name the field."""

from __future__ import annotations

import io
import time

import pytest

from rapidlm.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-key-file", "/no/such/key"], "api key file"),
        (["--port", "70000"], "ServerConfig.port"),
        (["--drain-timeout", "-1"], "ServerConfig.drain_timeout"),
        (["--max-running", "0"], "max_running"),
        (["--kv-blocks", "0"], "EngineConfig.kv_blocks"),
        (["--max-batched-tokens", "8"], "max_batched_tokens"),
    ],
)
def test_bad_settings_fail_before_loading(argv, message, capsys):
    start = time.perf_counter()
    assert main(["serve", *argv], out=io.StringIO()) == 2
    assert message in capsys.readouterr().err
    assert time.perf_counter() - start < 5  # no model was loaded


def test_empty_key_file_is_refused(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("\n")
    assert main(["serve", "--api-key-file", str(key)], out=io.StringIO()) == 2
    assert "empty" in capsys.readouterr().err
