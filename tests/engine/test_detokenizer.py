"""Incremental detokenization: deltas join to the full decode, incomplete characters wait."""

from __future__ import annotations

import pytest

from rapidlm.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from rapidlm.loading.gguf import open_gguf
from rapidlm.loading.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(open_gguf(gguf_path).metadata)


@pytest.mark.parametrize("text", ["Hello, world!", "日本語のテキスト 🚀🚀 naïve café", "a  b\n\n  c\t", "x🙂y"])
def test_deltas_join_to_decode(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode("Prompt:"))
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)  # no half characters were ever released


def test_multibyte_character_waits_for_its_last_byte(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1  # byte-level BPE splits this emoji
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🚀"


def test_stop_matcher_finds_earliest_and_holds_back():
    m = StopStringMatcher(["END", "##"])
    assert m.find("abc ## x END", 0) == (4, "##")
    assert m.find("abcEN", 3) is None
    assert m.find("abcEND", 5) == (3, "END")  # a stop spanning old and new text is found
    assert m.safe_length("abcEN") == 3  # "EN" could still become "END"
    assert StopStringMatcher([]).safe_length("abc") == 3
