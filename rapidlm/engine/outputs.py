"""What generation returns: final outputs with timings, and the chunks a stream yields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    prompt_tokens: int
    output_tokens: int
    time_to_first_token_s: float  # from the call's start to this request's first token
    prefill_time_s: float  # this request's own prefill forward
    decode_time_s: float  # from the first token to the last

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_time_s if self.prefill_time_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which came from prefill) per second of decoding."""
        n = self.output_tokens - 1
        return n / self.decode_time_s if n > 0 and self.decode_time_s > 0 else float("nan")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class StreamChunk:
    """New text for one request. The last chunk of a request has `finish_reason` and the full `output`."""

    request_id: str
    index: int  # position of the prompt in the call
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    output: RequestOutput | None = None


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before temperature or penalties)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # top-n alternatives (id, logprob), best first


@dataclass
class EngineOutput:
    """One step's news for one request of the continuous-batching engine."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # text safe to stream now (stop strings held back); joined deltas == the final text
    new_logprobs: list[TokenLogprob] | None  # one per new token, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob | None] | None  # first output only, when asked; None for the first token
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the engine ended the request itself (shutdown, internal failure)


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found there
    preemptions: int
    prompt_tokens: int  # prompt tokens computed (cache hits excluded)
    generation_tokens: int
    steps: int
