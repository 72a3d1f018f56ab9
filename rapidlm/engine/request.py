"""A request's state while it is being generated."""

from __future__ import annotations

from dataclasses import dataclass, field

from rapidlm.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from rapidlm.engine.sampling import SamplingParams, SequenceSampler


@dataclass
class Sequence:
    request_id: str
    index: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SequenceSampler
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    max_len: int  # the last position this sequence may occupy + 1 (context or cache bound)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    streamed: int = 0  # characters of `text` already handed to the caller
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prefill_time: float = 0.0
    first_token_time: float = 0.0
    finish_time: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, eos_token_ids: set[int] | frozenset[int] | list[int]) -> None:
        """Record one new token: stop checks (EOS, stop tokens, stop strings, length) and detokenization."""
        p = self.params
        self.output_ids.append(token)
        self.sampler.observe(token)
        if token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
            self.finish_reason, self.stop_reason = "stop", token
        else:
            self._add_text(self.detok.add(token))
        if not self.finished and (
            len(self.output_ids) >= p.max_tokens or len(self.prompt_ids) + len(self.output_ids) >= self.max_len
        ):
            self.finish_reason = "length"
        if self.finished and not isinstance(self.stop_reason, str):  # a stop string already cut the text
            self._add_text(self.detok.flush())

    def take_delta(self) -> str:
        """Text not yet handed out that is safe to stream (it cannot turn out to start a stop string)."""
        safe = len(self.text) if self.finished else self.stops.safe_length(self.text)
        delta, self.streamed = self.text[self.streamed : safe], max(self.streamed, safe)
        return delta

    def _add_text(self, delta: str) -> None:
        if not delta or isinstance(self.stop_reason, str):
            return
        old = len(self.text)
        self.text += delta
        hit = self.stops.find(self.text, old) if self.stops.stops else None
        if hit is not None:
            self.text = self.text[: hit[0]]
            self.finish_reason, self.stop_reason = "stop", hit[1]

    @property
    def next_position(self) -> int:
        """Position the most recent token will take when fed back in."""
        return len(self.prompt_ids) + len(self.output_ids) - 1
