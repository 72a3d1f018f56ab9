"""Request models: the constraints the schema promises are the ones enforced."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rapidlm.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest


def completion(**kw):
    return CompletionRequest(model="m", **{"prompt": "x", **kw})


@pytest.mark.parametrize("prompt", ["text", [1, 2, 3], ["a", "b"], [[1, 2], [3]]])
def test_prompt_shapes(prompt):
    assert completion(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("prompt", [[], [[]], [-1], [[1], []], [1.5], None])
def test_bad_prompts(prompt):
    with pytest.raises(ValidationError):
        completion(prompt=prompt)


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -0.1},
        {"temperature": 2.1},
        {"top_p": 0},
        {"top_p": 1.01},
        {"logprobs": 21},
        {"logprobs": -1},
        {"max_tokens": 0},
        {"stop": ["1", "2", "3", "4", "5"]},
        {"stop": ""},
        {"n": 0},
        {"seed": 2**64},
        {"seed": 2**64 - 1},
        {"unknown": 1},
        {"stream_options": {"include_usage": True, "x": 1}},
    ],
)
def test_completion_constraints(kw):
    with pytest.raises(ValidationError):
        completion(**kw)


def test_max_tokens_zero_with_echo_and_defaults():
    assert completion(max_tokens=0, echo=True).max_tokens == 0
    r = completion()
    assert (r.max_tokens, r.n, r.stream, r.echo, r.logprobs, r.temperature) == (16, 1, False, False, None, None)
    assert completion(stop="a").stop == "a" and completion(stop=["a", "b", "c", "d"]).stop == ["a", "b", "c", "d"]


def test_cross_field_errors_name_their_field():
    with pytest.raises(ValidationError) as exc:
        completion(max_tokens=0)
    assert exc.value.errors()[0]["ctx"]["param"] == "max_tokens"
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert exc.value.errors()[0]["ctx"]["param"] == "top_logprobs"


def test_chat_messages():
    r = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    )
    assert r.messages[0].text() == "ab"
    for bad in (
        [],
        [{"role": "tool", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    ):
        with pytest.raises(ValidationError):
            ChatCompletionRequest(model="m", messages=bad)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_api_error_body():
    body = APIError(429, "busy", code="engine_full").body()
    assert body == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "engine_full"}}
