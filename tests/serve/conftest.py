"""Fixtures for the server tests: the real tokenizer (no weights) and apps over a fake engine."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from rapidlm.loading.loader import load_tokenizer
from rapidlm.serve import ServerConfig, create_app
from tests.serve.fake_engine import FakeEngine

MODEL = "smollm2-135m"
KEY = "sk-test-1234567890"


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture
def engine(tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine, tokenizer):
    app = create_app(engine, tokenizer, MODEL, ServerConfig(max_body_bytes=64 * 1024))
    with TestClient(app) as c:
        yield c


@pytest.fixture
def authed_client(engine, tokenizer):
    app = create_app(engine, tokenizer, MODEL, ServerConfig(api_key=KEY))
    with TestClient(app) as c:
        yield c
