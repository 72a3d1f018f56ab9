"""Shared fixtures. The real default model loads once per session, in each dtype a test asks for."""

from __future__ import annotations

import pytest
import torch

from rapidlm import LLM
from rapidlm.loading import resolve_model

WIKITEXT = "../shared/data/wikitext-2/valid.txt"


@pytest.fixture(scope="session")
def gguf_path():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def llm_fp32() -> LLM:
    return LLM("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def llm_auto() -> LLM:
    return LLM("smollm2-135m", device="cpu", dtype="auto")


@pytest.fixture(scope="session")
def hf_reference(gguf_path):
    """transformers' own GGUF reader and LlamaForCausalLM on the same file: an independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def wikitext_lines() -> list[str]:
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / WIKITEXT
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if len(ln) > 40]
