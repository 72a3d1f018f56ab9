"""The HTTP layer over a fake engine: request mapping, response formats, streaming, errors and limits."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from rapidlm.serve import ServerConfig, create_app
from rapidlm.serve.app import drain
from tests.serve.conftest import KEY, MODEL
from tests.serve.fake_engine import REPLY

PROMPT = "The capital of France is"
JSON = {"content-type": "application/json"}


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded, with the final "[DONE]" kept as a string."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- completions ----------------------------------------------------------------------------------------


def test_completion_maps_to_engine_and_answers_openai_format(client, engine, tokenizer):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "seed": 7, "stop": ["zzz"]}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "text_completion" and out["model"] == MODEL and out["id"].startswith("cmpl-")
    reply_ids = tokenizer.encode(REPLY, add_special_tokens=False)
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["text"] == tokenizer.decode(reply_ids[:5])
    n_prompt = len(tokenizer.encode(PROMPT))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}
    [(_, prompt_ids, params, logprobs, prompt_logprobs)] = engine.submitted
    assert prompt_ids == tokenizer.encode(PROMPT)
    assert (params.max_tokens, params.temperature, params.seed, params.stop) == (5, 0, 7, ["zzz"])
    assert logprobs is None and prompt_logprobs is None


def test_completion_defaults_follow_openai(client, engine):
    assert client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"}).status_code == 200
    params = engine.submitted[0][2]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (16, 1.0, 1.0, 0)


def test_stop_string_cuts_the_text(client):
    out = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "stop": "fox"})
    choice = out.json()["choices"][0]
    assert choice["text"] == " The quick brown " and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "fox"


def test_batched_prompts_give_one_choice_each(client, tokenizer):
    ids = tokenizer.encode("Hello there")
    for prompt in (["a", "b", "c"], [ids, ids[:1]]):
        out = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3}).json()
        assert sorted(c["index"] for c in out["choices"]) == list(range(len(prompt)))
        assert out["usage"]["completion_tokens"] == 3 * len(prompt)
    single = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 2}).json()
    assert len(single["choices"]) == 1  # a flat list of ints is one prompt


def test_echo_with_logprobs_scores_the_prompt(client, tokenizer):
    """What lm-evaluation-harness sends for loglikelihood: echo, logprobs=1, max_tokens=1 (or 0)."""
    ids = tokenizer.encode(PROMPT)
    body = {"model": MODEL, "prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v == -0.25 for v in lp["token_logprobs"][1:])
    # lm-eval's greedy check: the token's logprob equals the best alternative's.
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(PROMPT)
    offsets = [0]
    for tok in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(tok))
    assert lp["text_offset"] == offsets

    body["max_tokens"] = 0  # the prompt alone
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["text"] == PROMPT and len(choice["logprobs"]["tokens"]) == len(ids)
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 0


def test_logprobs_without_echo_cover_generated_tokens(client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "logprobs": 2}
    lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and lp["text_offset"][0] == 0
    assert all(len(top) == 2 for top in lp["top_logprobs"])


def test_streamed_completion_equals_the_unstreamed_one(client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "stop": ["lazy"]}
    full = client.post("/v1/completions", json=body).json()
    resp = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert usage["choices"] == [] and usage["usage"] == full["usage"]


def test_streamed_echo_sends_the_prompt_first(client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 0, "stream": True}
    events = sse_events(client.post("/v1/completions", json=body).text)
    first = events[0]["choices"][0]
    assert first["text"].startswith(PROMPT) and first["logprobs"]["token_logprobs"][0] is None


def test_streamed_batch_tags_choices_by_index(client):
    body = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3, "stream": True}
    events = sse_events(client.post("/v1/completions", json=body).text)[:-1]
    texts = {0: "", 1: ""}
    for e in events:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts[0] == texts[1] == " The quick brown"


# ---- chat -----------------------------------------------------------------------------------------------


def test_chat_uses_the_chat_template(client, engine, tokenizer):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    out = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4}).json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": " The quick brown fox"}
    expected = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert engine.submitted[0][1] == expected
    assert out["usage"]["prompt_tokens"] == len(expected)


def test_chat_default_max_tokens_is_the_rest_of_the_context(client, engine):
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    _, ids, params, _, _ = engine.submitted[0]
    assert params.max_tokens == engine.max_model_len - len(ids)


def test_chat_content_parts_and_max_completion_tokens(client):
    msg = {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
    out = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [msg], "max_completion_tokens": 2})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2


def test_chat_logprobs_format(client):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "logprobs": True,
        "top_logprobs": 2,
    }
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode() == entry["token"] and len(entry["top_logprobs"]) == 2


def test_streamed_chat(client):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(client.post("/v1/chat/completions", json=body).text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 6
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[1:-2])
    assert content == " The quick brown fox jumps over"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


# ---- models, probes, metrics, playground ----------------------------------------------------------------


def test_models_and_probes(client, engine):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").json()["max_model_len"] == engine.max_model_len
    error_of(client.get("/v1/models/other"), 404)
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    engine.ready = False
    assert error_of(client.get("/ready"), 503)["code"] == "engine_not_ready"


def test_metrics_count_engine_state_and_latencies(client):
    client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for line in (
        "rapidlm_requests_running 0.0",
        "rapidlm_kv_blocks_used 0.0",
        "rapidlm_kv_blocks_total 100.0",
        "rapidlm_generation_tokens_total 4.0",
        'rapidlm_requests_total{finish_reason="length"} 1.0',
        "rapidlm_time_to_first_token_seconds_count 1.0",
        "rapidlm_inter_token_latency_seconds_count 3.0",
    ):
        assert line in text, line
    for name in ("rapidlm_requests_queued", "rapidlm_preemptions_total", "rapidlm_prefix_cache_hit_tokens_total"):
        assert name in text


def test_playground_page(client):
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    for needle in ('id="input"', 'id="send"', 'id="messages"', '"assistant"', "/v1/chat/completions"):
        assert needle in resp.text
    assert "http://" not in resp.text and "https://" not in resp.text  # no CDN, nothing fetched from outside


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),  # only with echo
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, -2]]}, "prompt"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"model": None}, "model"),
    ],
)
def test_schema_violations_are_422_naming_the_field(client, body, param):
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", **body}), 422)
    assert err["param"] is not None and err["param"].startswith(param), err
    assert err["type"] == "invalid_request_error" and param in err["message"]


def test_chat_schema_violations(client):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    assert error_of(client.post("/v1/chat/completions", json={**base, "top_logprobs": 2}), 422)["param"] == (
        "top_logprobs"
    )
    bad_role = {**base, "messages": [{"role": "wizard", "content": "Hi"}]}
    assert error_of(client.post("/v1/chat/completions", json=bad_role), 422)["param"].startswith("messages.0")
    assert error_of(client.post("/v1/chat/completions", json={**base, "messages": []}), 422)["param"] == "messages"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"suffix": "x"}, "suffix"),
    ],
)
def test_unsupported_options_are_400(client, body, param):
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", **body}), 400)
    assert err["param"] == param


def test_invalid_json_and_wrong_shapes(client):
    resp = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert error_of(resp, 400)["code"] == "invalid_json"
    error_of(client.post("/v1/completions", json=[1, 2]), 422)
    error_of(client.post("/v1/completions"), 422)
    error_of(client.get("/v1/completions"), 405)
    error_of(client.get("/v1/nothing"), 404)


def test_prompt_too_long_is_400_context_length_exceeded(client, engine):
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1000}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    long = "word " * 200
    err = error_of(
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": long}]}), 400
    )
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert not engine.submitted  # checked before admission


def test_bad_token_ids_empty_prompts_and_bad_text(client):
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]}), 400)
    assert err["param"] == "prompt" and "token ids" in err["message"]
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": ""}), 422)
    assert err["param"] == "prompt" and err["message"].startswith("prompt: ")
    lone_surrogate = b'{"model": "smollm2-135m", "prompt": "a\\ud800"}'  # valid JSON, not valid text
    assert error_of(client.post("/v1/completions", content=lone_surrogate, headers=JSON), 422)["param"] == "prompt"


def test_unknown_model_is_404(client):
    err = error_of(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404)
    assert (err["code"], err["param"]) == ("model_not_found", "model")


def test_engine_full_is_429_and_nothing_is_left_behind(client, engine):
    engine.capacity = 2
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"]}), 429)
    assert err["code"] == "engine_full" and err["type"] == "rate_limit_error"
    assert not engine.active  # the two admitted prompts were aborted, their blocks freed
    assert engine.stats().kv_blocks_used == 0
    assert 'rapidlm_requests_rejected_total{status="429"} 1.0' in client.get("/metrics").text


def test_body_over_the_limit_is_413(client):
    big = {"model": MODEL, "prompt": "x" * 70_000}
    assert error_of(client.post("/v1/completions", json=big), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(80):
            yield b"x" * 1000

    resp = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    error_of(resp, 413)


def test_draining_answers_503_and_aborts_leftovers(engine, tokenizer):
    app = create_app(engine, tokenizer, MODEL, ServerConfig())
    engine.step_delay = 0.02
    with TestClient(app) as client:
        # drain with a timeout too short for the running stream: it must end with an error event, not hang.
        async def stream_then_drain():
            import httpx

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
                body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 50, "stream": True}
                req = asyncio.ensure_future(ac.post("/v1/completions", json=body))
                while not engine.active:
                    await asyncio.sleep(0.01)
                await drain(app, timeout=0.05)
                resp = await req
                refused = await ac.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
                ready = await ac.get("/ready")
                return resp, refused, ready

        resp, refused, ready = client.portal.call(stream_then_drain)
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert events[-2]["error"]["code"] == "request_aborted" and "shut down" in events[-2]["error"]["message"]
    assert error_of(refused, 503)["code"] == "server_draining"
    assert error_of(ready, 503)["code"] == "server_draining"


def test_unstreamed_request_aborted_by_drain_is_503(engine, tokenizer):
    app = create_app(engine, tokenizer, MODEL, ServerConfig())
    engine.step_delay = 0.02
    with TestClient(app) as client:

        async def run():
            import httpx

            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
                req = asyncio.ensure_future(
                    ac.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50})
                )
                while not engine.active:
                    await asyncio.sleep(0.01)
                await drain(app, timeout=0.05)
                return await req

        resp = client.portal.call(run)
    assert error_of(resp, 503)["code"] == "request_aborted"


# ---- authentication -------------------------------------------------------------------------------------


def test_every_api_route_needs_the_key(authed_client):
    c = authed_client
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    for resp in (
        c.post("/v1/completions", json=body),
        c.post("/v1/completions", json=body, headers={"authorization": "Bearer wrong"}),
        c.post("/v1/completions", json=body, headers={"authorization": KEY}),  # no scheme
        c.post("/v1/chat/completions", content=b"{garbage"),  # 401 before the body is even parsed
        c.get("/v1/models"),
        c.get("/openapi.json"),
    ):
        err = error_of(resp, 401)
        assert err["code"] == "invalid_api_key" and resp.headers["www-authenticate"] == "Bearer"
    ok = c.post("/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    for path in ("/health", "/ready", "/metrics", "/"):
        assert c.get(path).status_code == 200, path


def test_openapi_schema_documents_errors_and_auth(authed_client):
    schema = authed_client.get("/openapi.json", headers={"authorization": f"Bearer {KEY}"}).json()
    op = schema["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "404", "413", "422", "429", "503"} <= set(op["responses"])
    assert "text/event-stream" in op["responses"]["200"]["content"]
    assert op["security"] and "HTTPBearer" in schema["components"]["securitySchemes"]
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["temperature"]["anyOf"][0]["maximum"] == 2


def test_types_are_strict_but_integral_floats_count_as_ints(client, engine):
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": [1.0, 2.0], "max_tokens": 2.0, "seed": 3.0})
    assert ok.status_code == 200, ok.text
    assert engine.submitted[0][1] == [1, 2] and engine.submitted[0][2].seed == 3
    for bad in ({"seed": "3"}, {"echo": 0}, {"temperature": "0.5"}, {"max_tokens": 2.5}, {"stream": "true"}):
        error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", **bad}), 422)


def test_model_dependent_bounds_are_checked_and_in_the_schema(client, engine):
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop_token_ids": [10**6]}), 400)
    assert err["param"] == "stop_token_ids"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2}
    err = error_of(client.post("/v1/chat/completions", json={**chat, "max_tokens": 10**6}), 400)
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    props = schema["CompletionRequest"]["properties"]
    assert props["model"]["enum"] == [MODEL] and props["max_tokens"]["maximum"] == engine.max_model_len
    assert props["prompt"]["anyOf"][1]["items"]["maximum"] == 49151  # vocabulary size - 1
    assert "x-rapidlm-bound" not in json.dumps(schema)
    assert props["n"]["maximum"] == 1 and "allOf" in schema["CompletionRequest"]
