"""Incremental detokenization and stop strings, so streamed text equals the final text exactly."""

from __future__ import annotations

from collections.abc import Sequence

from rapidlm.loading.tokenizer import Tokenizer

# Prompt tokens decoded before the first output token: some decoders (SentencePiece's leading-space rule)
# only produce the right text for a token given what stands before it.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    A delta is released only when the decoded text has grown and does not end in U+FFFD, so a multi-byte
    character split across tokens, or a byte-level BPE piece that is only valid with its successor, waits
    until it is whole (the offsets scheme vLLM and TGI use).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of a sequence: release whatever is held back, incomplete characters included."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


class StopStringMatcher:
    """Finds stop strings in growing text and says how much text is safe to stream.

    Text that could still turn out to be the start of a stop string is held back, so a stream never shows
    characters that the final (truncated) text does not contain.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def find(self, text: str, new_from: int) -> tuple[int, str] | None:
        """Earliest stop string that ends after `new_from` (its first new char); (index, stop) or None."""
        best: tuple[int, str] | None = None
        for stop in self.stops:
            i = text.find(stop, max(0, new_from - len(stop) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        return best

    def safe_length(self, text: str) -> int:
        return max(0, len(text) - self.holdback)
