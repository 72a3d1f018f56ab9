"""Engine logprobs → OpenAI's two wire formats (legacy completions, chat), with each token's text and bytes.

A byte-level BPE token can hold part of a UTF-8 character, so its text alone is not always printable: like
OpenAI, such a token is shown as "bytes:\\xe2\\x80" in the legacy format, and the chat format carries each
token's exact bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rapidlm.serve.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

if TYPE_CHECKING:
    from rapidlm.engine.outputs import TokenLogprob
    from rapidlm.loading.tokenizer import Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table (what ByteLevel BPE vocabularies are written in), inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenTexts:
    """Each token id's exact bytes and display text, cached (a vocabulary is small, lookups are hot)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer.backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_table = _byte_level_decoder() if self._byte_level else {}
        self._special = set(getattr(tokenizer.backend, "get_added_tokens_decoder", dict)().keys())
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)
        self.text = functools.lru_cache(maxsize=65536)(self._text)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._special:
            return piece.encode("utf-8")
        if self._byte_level and all(c in self._byte_table for c in piece):
            return bytes(self._byte_table[c] for c in piece)
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:  # SentencePiece byte fallback
            return bytes([int(m.group(1), 16)])
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def _text(self, token_id: int) -> str:
        raw = self._bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(
    texts: TokenTexts,
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob | None],
    text_start: int = 0,
) -> CompletionLogprobs:
    """Legacy format for `token_ids` (prompt tokens first when echoing; their first entry is None).

    text_offset is each token's character offset in the returned text, counted from the tokens' own texts.
    """
    out = CompletionLogprobs()
    extend_completion_logprobs(out, texts, token_ids, logprobs, text_start)
    return out


def extend_completion_logprobs(
    out: CompletionLogprobs,
    texts: TokenTexts,
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob | None],
    text_start: int,
) -> int:
    """Append tokens to `out`; returns the text offset after them (where the next tokens start)."""
    offset = text_start
    for tid, lp in zip(token_ids, logprobs):
        token = texts.text(tid)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(lp.logprob)
        # The chosen token is always in the map (vLLM does the same), so max(top.values()) == its logprob
        # exactly when it was the greedy choice: how lm-evaluation-harness decides `is_greedy`.
        top: dict[str, float] = {}
        for alt_id, alt_lp in lp.top:
            top.setdefault(texts.text(alt_id), alt_lp)
        top.setdefault(token, lp.logprob)
        out.top_logprobs.append(top)
    return offset


def chat_logprobs(texts: TokenTexts, logprobs: Sequence[TokenLogprob], top_n: int) -> ChatLogprobs:
    content = []
    for lp in logprobs:
        top = [TopLogprob(token=texts.text(t), logprob=v, bytes=list(texts.bytes(t))) for t, v in lp.top[:top_n]]
        content.append(
            ChatTokenLogprob(
                token=texts.text(lp.token_id),
                logprob=lp.logprob,
                bytes=list(texts.bytes(lp.token_id)),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)
