"""SIGTERM under load against a spawned server: stop admitting, drain, end every request clearly, exit 0."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.serve.spawn import SpawnedServer

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
DRAIN_S = 4.0


def stream(url: str, max_tokens: int, result: dict) -> None:
    """One streamed completion; records its events and how it ended."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    result["events"] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: ") :]
                    result["events"].append(data if data == "[DONE]" else json.loads(data))
    except httpx.HTTPError as exc:  # recorded, and the test fails on it: a drained stream must end cleanly
        result["exception"] = exc


def unstreamed(client: openai.OpenAI, result: dict) -> None:
    try:
        result["response"] = client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=2000, extra_body={"ignore_eos": True}
        )
    except openai.APIError as exc:
        result["exception"] = exc


def test_sigterm_drains_then_exits_cleanly():
    srv = SpawnedServer(["--model", MODEL, "--drain-timeout", str(DRAIN_S), "--max-running", "8"]).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        short = [{} for _ in range(2)]
        long = [{} for _ in range(2)]
        plain: dict = {}
        threads = [threading.Thread(target=stream, args=(srv.url, 16, r)) for r in short]
        threads += [threading.Thread(target=stream, args=(srv.url, 2000, r)) for r in long]
        threads.append(threading.Thread(target=unstreamed, args=(client, plain)))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while srv.metric("rapidlm_requests_running") + srv.metric("rapidlm_requests_queued") < 5:
            assert time.monotonic() < deadline, f"requests were not all admitted:\n{srv.log}"
            time.sleep(0.05)

        t_term = time.monotonic()
        srv.terminate()
        time.sleep(0.3)
        refused = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
        assert httpx.get(f"{srv.url}/ready", timeout=10).status_code == 503
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200  # alive while draining

        for t in threads:
            t.join(DRAIN_S + 30)
            assert not t.is_alive(), "a request hung through the drain"
        code = srv.proc.wait(DRAIN_S + 20)
        elapsed = time.monotonic() - t_term
    finally:
        srv.stop()
    assert code == 0, srv.log
    assert elapsed < DRAIN_S + 15

    for r in short + long:
        assert "exception" not in r and r["status"] == 200
        events = r["events"]
        assert events[-1] == "[DONE]"  # every stream ends properly, finished or not
        last = events[-2]
        if "error" in last:  # cut by the drain: a clear error, not a silent end
            assert last["error"]["code"] == "request_aborted" and "shut down" in last["error"]["message"]
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    for r in long:  # 2000 tokens cannot finish in the drain window: they were aborted, clearly
        assert "error" in r["events"][-2]
    exc = plain.get("exception")
    assert isinstance(exc, openai.APIStatusError) and exc.status_code == 503, plain
    assert exc.body["code"] == "request_aborted"
