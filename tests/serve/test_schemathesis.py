"""Schemathesis fuzzes a real spawned server from its own OpenAPI schema: no request may get a 5xx.

The server runs the real engine and app over a tiny random model (256-token context), so the hundreds of
generated requests, many of them valid generations, finish in seconds on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import save_hf_folder, tiny_hf_model
from tests.serve.spawn import SpawnedServer

pytestmark = pytest.mark.slow

KEY = "sk-fuzz"
EXAMPLES = 25  # per operation (x ~7 operations, in every phase)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp / "tiny")
    (tmp / "key").write_text(KEY)
    srv = SpawnedServer(
        ["--model", str(folder), "--dtype", "float32", "--api-key-file", str(tmp / "key"), "--max-running", "4"],
        api_key=KEY,
    )
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_schemathesis_finds_no_server_errors(server, tmp_path: Path):
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(cli), "run", f"{server.url}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", str(EXAMPLES),
        "--seed", "20261127",
        "--header", f"Authorization: Bearer {KEY}",
        "--generation-database", "none",
        "--request-timeout", "60",
        "--workers", "1",
        "--no-color",
        "--suppress-health-check", "filter_too_much",  # GET /v1/models/{model}: a path parameter fixed to one name
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ})
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts and int(counts[1]) == int(counts[2]) >= 200, report[-3000:]
    assert server.proc.poll() is None, "the server died during fuzzing:\n" + server.log[-3000:]
