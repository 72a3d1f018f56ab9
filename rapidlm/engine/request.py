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

    @property
    def next_position(self) -> int:
        """Position the most recent token will take when fed back in."""
        return len(self.prompt_ids) + len(self.output_ids) - 1
