"""Token texts and bytes, and the two logprob wire formats."""

from __future__ import annotations

from rapidlm.engine.outputs import TokenLogprob
from rapidlm.serve.logprobs import TokenTexts, chat_logprobs, completion_logprobs


def test_token_bytes_rebuild_the_text(tokenizer):
    texts = TokenTexts(tokenizer)
    for s in ("Hello world", "naïve café 😀", "\n\n  indented", "<|im_end|>"):
        ids = tokenizer.encode(s)
        assert b"".join(texts.bytes(i) for i in ids).decode() == s


def test_partial_characters_are_shown_as_bytes(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # byte-level BPE splits the emoji
    shown = [texts.text(i) for i in ids]
    assert all(t.startswith("bytes:\\x") for t in shown)


def test_completion_format_includes_the_chosen_token(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("Hello world")
    lps = [None, TokenLogprob(ids[1], -2.0, [(ids[0], -0.5)])]
    out = completion_logprobs(texts, ids, lps, text_start=3)
    assert out.tokens == ["Hello", " world"] and out.text_offset == [3, 8]
    assert out.token_logprobs == [None, -2.0]
    assert out.top_logprobs == [None, {"Hello": -0.5, " world": -2.0}]


def test_chat_format(tokenizer):
    texts = TokenTexts(tokenizer)
    [tid] = tokenizer.encode(" world")
    out = chat_logprobs(texts, [TokenLogprob(tid, -1.0, [(tid, -1.0), (tid + 1, -3.0)])], top_n=1)
    [entry] = out.content
    assert (entry.token, entry.logprob, bytes(entry.bytes)) == (" world", -1.0, b" world")
    assert [t.token for t in entry.top_logprobs] == [" world"]
