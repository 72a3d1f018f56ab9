"""The tokenizer built from GGUF metadata against transformers' own GGUF tokenizer, and chat templates."""

from __future__ import annotations

import pytest

from rapidlm.loading.gguf import open_gguf
from rapidlm.loading.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ours(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(open_gguf(gguf_path).metadata)


@pytest.fixture(scope="module")
def theirs(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_encode_matches_transformers_on_wikitext(ours, theirs, wikitext_lines):
    extra = ["digits 1234567 and 3.14159", "  leading spaces\n\n\ttabs", "émojis 🚀 and 日本語", "<|im_start|>user"]
    for text in wikitext_lines[:200] + extra:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=True), text


def test_decode_round_trips(ours, wikitext_lines):
    for text in wikitext_lines[:50] + ["日本語 🚀 ünïcödé"]:
        assert ours.decode(ours.encode(text)) == text


def test_special_tokens(ours):
    assert ours.eos_token == "<|im_end|>" and 2 in ours.eos_token_ids
    assert ours.encode("<|im_start|>") == [1]  # a control token is matched whole, not split
    assert ours.decode([1, 28120, 2]) == ours.decode([28120])  # and skipped when decoding


def test_chat_template_matches_transformers(ours, theirs):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    for msgs in (messages, messages[1:2]):
        expected = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(msgs, add_generation_prompt=True) == expected


def test_chat_template_is_sandboxed(ours):
    """A template cannot reach Python internals (templates ship with downloaded checkpoints)."""
    from jinja2.exceptions import SecurityError

    evil = Tokenizer(ours.backend, [2], chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_messages_are_rejected(ours):
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        ours.apply_chat_template([{"content": "no role"}])
