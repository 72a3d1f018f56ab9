"""End to end: a spawned `rapidlm serve` with the real default model, driven by the official openai client.

One server for the module (loading takes seconds on 2 cores); generations are short. Outputs are compared
with LLM.generate / LLM.chat in this process for the same inputs, both in fp32: there batching, chunked prefill
and the paged kernel move logits by ~1e-6 and tokens are identical; with bf16 activations such differences
are rounded up and greedy outputs can part after some tokens (docs/serving.md).
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

from rapidlm import SamplingParams
from tests.serve.spawn import SpawnedServer

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
KEY = "sk-rapidlm-test"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("serve") / "key"
    key_file.write_text(KEY + "\n")
    srv = SpawnedServer(
        ["--model", MODEL, "--dtype", "float32", "--api-key-file", str(key_file)]
        + ["--max-running", "2", "--max-queued", "2"],
        api_key=KEY,
    )
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def streamed_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += getattr(c, "text", None) or (c.delta.content if hasattr(c, "delta") else None) or ""
            finish = c.finish_reason or finish
    return text, finish


def test_unauthenticated_requests_get_401(server, client):
    for resp in (
        httpx.get(f"{server.url}/v1/models"),
        httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"}),
        httpx.post(f"{server.url}/v1/chat/completions", headers={"authorization": "Bearer nope"}, json={}),
    ):
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert [m.id for m in client.models.list().data] == [MODEL]
    for path in ("/health", "/ready", "/metrics", "/"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


def test_greedy_completions_equal_llm_generate(client, llm_fp32):
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = llm_fp32.generate(PROMPTS, params)
    for prompt, exp in zip(PROMPTS, expected):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == exp.text
        assert r.choices[0].finish_reason == exp.finish_reason
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == len(exp.token_ids)
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        assert streamed_text(stream) == (exp.text, exp.finish_reason)
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [e.text for e in expected]


def test_seeded_sampling_equals_llm_generate(client, llm_fp32):
    kw = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    exp = llm_fp32.generate(PROMPTS[0], SamplingParams(**kw))[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], **kw)
    assert r.choices[0].text == exp.text
    assert streamed_text(client.completions.create(model=MODEL, prompt=PROMPTS[0], stream=True, **kw))[0] == exp.text
    other = client.completions.create(model=MODEL, prompt=PROMPTS[0], **{**kw, "seed": 99})
    assert other.choices[0].text != exp.text  # the seed is really used (these 12 tokens differ)


def test_chat_equals_llm_chat(client, llm_fp32):
    messages = [{"role": "user", "content": "Name three colours."}]
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=7)):
        exp = llm_fp32.chat(messages, SamplingParams(max_tokens=10, **kw))[0]
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **kw)
        assert r.choices[0].message.content == exp.text and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(llm_fp32.chat_prompt(messages))
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}, **kw
        )
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == len(exp.token_ids)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == exp.text


def test_stop_strings_and_max_tokens(client, llm_fp32):
    full = llm_fp32.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0].text
    stop = full.strip().split()[1]  # a word that the greedy continuation reaches
    exp = llm_fp32.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == exp.text and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert streamed_text(stream) == (exp.text, "stop")
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_prompt_too_long_and_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=4)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt="x", temperature=5)


def test_loglikelihood_request_as_lm_eval_sends_it(client, llm_fp32):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    context = llm_fp32.tokenizer.encode("The capital of France is")
    ids = context + llm_fp32.tokenizer.encode(" Paris")
    body = dict(model=MODEL, prompt=[ids], temperature=0, max_tokens=1, logprobs=1, seed=1234, echo=True)
    r = client.completions.create(**body)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    # Reference: the model's own log-softmax over the whole sequence (static cache path).
    with torch.inference_mode():
        ref = torch.log_softmax(llm_fp32.runner.score(ids), dim=-1)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=1e-3)
    [(ll, greedy)] = LocalCompletionsAPI.parse_logprobs(r.model_dump(), ctxlens=[len(context)])
    assert ll == pytest.approx(want[-1], abs=1e-3)
    assert greedy == (int(ref[len(ids) - 2].argmax()) == ids[-1])
    scored = client.completions.create(**{**body, "max_tokens": 0})  # the prompt alone
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert scored.usage.completion_tokens == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_disconnect_mid_stream_frees_kv_blocks(server):
    aborted_before = server.metric('rapidlm_requests_total{finish_reason="abort"}')
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60) as r:
        lines = r.iter_lines()
        events = 0
        while events < 2:
            events += next(lines).startswith("data: ")
        assert server.metric("rapidlm_kv_blocks_used") > 0  # still connected: the request holds its blocks
        lines.close()  # httpx closes the connection here
    # The client is gone; within a few steps the request is aborted and its blocks are back.
    deadline = time.monotonic() + 10
    while server.metric("rapidlm_kv_blocks_used") > 0:
        assert time.monotonic() < deadline, "KV blocks still held 10 s after the client disconnected"
        time.sleep(0.05)
    assert server.metric("rapidlm_requests_running") == 0
    assert server.metric('rapidlm_requests_total{finish_reason="abort"}') == aborted_before + 1

    # Unstreamed: the client gives up waiting (read timeout closes the connection) and the work stops too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, headers=server.headers, timeout=1.0)
    deadline = time.monotonic() + 10
    while server.metric("rapidlm_kv_blocks_used") > 0 or server.metric("rapidlm_requests_running") > 0:
        assert time.monotonic() < deadline, "an abandoned unstreamed request kept running"
        time.sleep(0.05)
    assert server.metric('rapidlm_requests_total{finish_reason="abort"}') == aborted_before + 2


def test_beyond_running_and_queued_bounds_is_429(server, client):
    results: list[object] = []

    def one() -> None:
        try:
            results.append(
                client.completions.create(
                    model=MODEL, prompt="Count: 1, 2,", max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
                )
            )
        except openai.RateLimitError as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(7)]  # 2 running + 2 queued fit
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(results) == 7 and refused and len(served) >= 4
    assert all(r.code == "engine_full" for r in refused)
    assert len({r.choices[0].text for r in served}) == 1  # greedy: the same text, batched or not
    assert server.metric('rapidlm_requests_rejected_total{status="429"}') == len(refused)
    assert server.metric("rapidlm_kv_blocks_used") == 0
