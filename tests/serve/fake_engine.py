"""A small stand-in for AsyncEngine with the same interface: deterministic, instant, and observable.

It "generates" a fixed reply's tokens (one per step), so app tests check the HTTP layer (mapping, formats,
errors, limits, streaming) in milliseconds, without the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rapidlm.engine.outputs import EngineOutput, EngineStats, TokenLogprob
from rapidlm.engine.sampling import SamplingParams
from rapidlm.errors import EngineFullError, EngineStoppedError, PromptTooLongError
from rapidlm.loading.tokenizer import Tokenizer

REPLY = " The quick brown fox jumps over the lazy dog. It was a sunny day, and the fox was happy."


def fake_logprob(token_id: int, n: int) -> TokenLogprob:
    """The token itself is the most likely, at -0.25; alternatives follow at -1, -2, ..."""
    top = [(token_id, -0.25)] + [(token_id + i + 1, -float(i + 1)) for i in range(max(0, n - 1))]
    return TokenLogprob(token_id=token_id, logprob=-0.25, top=top[:n])


@dataclass
class FakeEngine:
    tokenizer: Tokenizer
    max_model_len: int = 128
    capacity: int = 8  # running + queued
    step_delay: float = 0.0  # seconds between tokens
    block_size: int = 16
    ready: bool = True
    reply: str = REPLY
    active: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    submitted: list[tuple[str, list[int], SamplingParams, int | None, int | None]] = field(default_factory=list)
    stopped: bool = False
    _abort_all: str | None = None
    _counts: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "gen": 0, "steps": 0, "blocks": 0})

    def start(self) -> None:
        pass

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"of {self.max_model_len} tokens"
            )

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> AsyncIterator[EngineOutput]:
        if self.stopped:
            raise EngineStoppedError("the engine is draining")
        if len(self.active) >= self.capacity:
            raise EngineFullError(f"{len(self.active)} requests running or queued (limit {self.capacity})")
        self.submitted.append((request_id, list(prompt_ids), params, logprobs, prompt_logprobs))
        self.active.add(request_id)
        blocks = -(-len(prompt_ids) // self.block_size)
        self._counts["blocks"] += blocks
        self._counts["prompt"] += len(prompt_ids)
        reply_ids = self.tokenizer.encode(self.reply, add_special_tokens=False)
        out_ids: list[int] = []
        text = ""
        streamed = 0
        finished = False
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step_delay)
                self._counts["steps"] += 1
                if self._abort_all is not None:
                    finished = True
                    yield self._out(
                        request_id, [], "", None, None, True, "abort", None, prompt_ids, out_ids, error=self._abort_all
                    )
                    return
                tid = reply_ids[i % len(reply_ids)]
                out_ids.append(tid)
                self._counts["gen"] += 1
                text = self.tokenizer.decode(out_ids)
                reason, stop_reason = None, None
                hit = [s for s in params.stop if s in text]
                if hit:
                    text = text[: min(text.index(s) for s in hit)]
                    reason, stop_reason = "stop", hit[0]
                elif len(out_ids) == params.max_tokens:
                    reason = "length"
                # Hold back a possible start of a stop string, as the real engine does.
                hold = max((len(s) for s in params.stop), default=1) - 1
                safe = len(text) if reason else max(streamed, len(text) - hold)
                delta, streamed = text[streamed:safe], safe
                lps = [fake_logprob(tid, logprobs)] if logprobs is not None else None
                plps = None
                if i == 0 and prompt_logprobs is not None:
                    plps = [None] + [fake_logprob(t, prompt_logprobs) for t in prompt_ids[1:]]
                finished = reason is not None
                yield self._out(request_id, [tid], delta, lps, plps, finished, reason, stop_reason, prompt_ids, out_ids)
                if finished:
                    return
        finally:
            if not finished:
                self.aborted.append(request_id)
            self.active.discard(request_id)
            self._counts["blocks"] -= blocks

    @staticmethod
    def _out(rid, ids, text, lps, plps, finished, reason, stop_reason, prompt_ids, out_ids, error=None):
        return EngineOutput(
            request_id=rid,
            new_token_ids=ids,
            new_text=text,
            new_logprobs=lps,
            prompt_logprobs=plps,
            finished=finished,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_prompt_tokens=len(prompt_ids),
            num_output_tokens=len(out_ids),
            num_cached_tokens=0,
            error=error,
        )

    def abort(self, request_id: str) -> None:  # pragma: no cover - the app aborts by closing iterators
        pass

    def stats(self) -> EngineStats:
        c = self._counts
        return EngineStats(
            running=len(self.active),
            waiting=0,
            kv_blocks_used=c["blocks"],
            kv_blocks_total=100,
            prefix_cache_queries=c["prompt"],
            prefix_cache_hits=0,
            preemptions=0,
            prompt_tokens=c["prompt"],
            generation_tokens=c["gen"],
            steps=c["steps"],
        )

    async def drain(self, timeout: float) -> None:
        self.stopped = True
        deadline = asyncio.get_running_loop().time() + timeout
        while self.active and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self.active:
            self._abort_all = "the server shut down before this request finished"
            while self.active:
                await asyncio.sleep(0.01)

    def shutdown(self) -> None:
        self.stopped = True
