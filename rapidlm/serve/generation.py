"""From an OpenAI request to engine work and back: prompts and SamplingParams in, choices and SSE chunks out.

Each prompt of a request is one engine request (a "job"). Jobs are admitted together and before any response
byte is sent, so a full engine (429), a draining server (503) or a prompt too long for the context (400) is
answered with a proper status even for a stream. After that, dropping the output iterators (client gone,
task cancelled) aborts the jobs and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rapidlm.engine.sampling import SamplingParams
from rapidlm.errors import (
    EngineFullError,
    EngineStoppedError,
    InvalidSamplingParamsError,
    ModelFormatError,
    PromptTooLongError,
)
from rapidlm.serve.logprobs import TokenTexts, chat_logprobs, extend_completion_logprobs
from rapidlm.serve.metrics import RequestTimer, ServerMetrics
from rapidlm.serve.protocol import (
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)

if TYPE_CHECKING:
    from rapidlm.engine.outputs import EngineOutput, TokenLogprob
    from rapidlm.loading.tokenizer import Tokenizer

_PARAM_IN_MESSAGE = re.compile(r"SamplingParams\.(\w+)")


@dataclass
class Job:
    """One prompt of a request, ready for the engine."""

    index: int
    prompt_ids: list[int]
    prompt_text: str  # what echo returns
    params: SamplingParams
    logprobs: int | None = None  # top alternatives per generated token; None = no logprobs
    prompt_logprobs: int | None = None  # the same for prompt tokens (echo with logprobs)
    score_only: bool = False  # max_tokens=0 with echo: the engine makes one token, which is dropped


@dataclass
class JobResult:
    """Everything one job produced, accumulated from its outputs."""

    job: Job
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None

    def add(self, out: EngineOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens
        if not self.job.score_only:
            self.text += out.new_text
            self.token_ids += out.new_token_ids
            if out.new_logprobs:
                self.logprobs += out.new_logprobs
            self.num_output_tokens = out.num_output_tokens
        if out.finished:
            self.finish_reason = "length" if self.job.score_only else out.finish_reason
            self.stop_reason = None if self.job.score_only else out.stop_reason
            self.error = out.error


# ---- building jobs --------------------------------------------------------------------------------------


def _unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Fields OpenAI has that rapidlm does not implement: a clear 400 instead of silently ignoring them."""
    if req.n != 1:
        raise APIError(
            400,
            f"n={req.n} is not supported: rapidlm returns one choice per prompt (n=1); "
            "send the request several times, with different seeds, for several samples",
            "n",
        )
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported (only 0); use repetition_penalty instead", name)
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of={req.best_of} is not supported (only 1)", "best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")


def _sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),  # OpenAI/vLLM say -1 for "off"; rapidlm says 0
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
        )
    except InvalidSamplingParamsError as exc:
        m = _PARAM_IN_MESSAGE.search(str(exc))
        raise APIError(400, str(exc), m.group(1) if m else None) from exc


class Jobs:
    """Turns validated requests into jobs, checking each prompt against the tokenizer and the context."""

    def __init__(self, engine: Any, tokenizer: Tokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.backend.get_vocab_size(with_added_tokens=True)

    def _checked(self, job: Job, param: str) -> Job:
        ids = job.prompt_ids
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty (it encodes to no tokens)", param)
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise APIError(400, f"{param}: token ids must be in [0, {self.vocab_size})", param)
        if any(t >= self.vocab_size for t in job.params.stop_token_ids):
            raise APIError(400, f"stop_token_ids: token ids must be in [0, {self.vocab_size})", "stop_token_ids")
        try:
            self.engine.check_request(ids, job.params)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param, "context_length_exceeded") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param) from exc
        return job

    def _encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except (TypeError, ValueError) as exc:  # e.g. a lone surrogate ("\ud800" is valid JSON, not valid text)
            raise APIError(400, f"prompt: cannot be tokenized ({exc})", "prompt") from exc

    def completion(self, req: CompletionRequest) -> list[Job]:
        _unsupported(req)
        score_only = req.max_tokens == 0
        # max_tokens None means "the default": OpenAI's legacy endpoint defaults to 16.
        params = _sampling_params(req, 1 if score_only else (req.max_tokens or 16))
        prompts: list[str | list[int]]
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            prompts = [p]  # type: ignore[list-item]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        jobs = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids, text = self._encode(prompt), prompt
            else:
                ids = list(prompt)
                text = self.tokenizer.decode(ids, skip_special_tokens=False) if req.echo else ""
            lp = req.logprobs
            job = Job(
                index=i,
                prompt_ids=ids,
                prompt_text=text,
                params=params,
                logprobs=lp,
                prompt_logprobs=lp if (req.echo and lp is not None) else None,
                score_only=score_only,
            )
            jobs.append(self._checked(job, "prompt"))
        return jobs

    def chat(self, req: ChatCompletionRequest) -> list[Job]:
        _unsupported(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            # What LLM.chat_prompt does: the template writes BOS itself, so no special tokens are added.
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        except (ValueError, ModelFormatError) as exc:
            raise APIError(400, f"messages: {exc}", "messages") from exc
        except Exception as exc:  # noqa: BLE001 - a template's own error (jinja2 TemplateError, SecurityError)
            raise APIError(400, f"messages: the chat template refused them: {exc}", "messages") from exc
        for name in ("max_tokens", "max_completion_tokens"):  # both bounded, even the one not used
            value = getattr(req, name)
            if value is not None and value > self.engine.max_model_len:
                raise APIError(
                    400,
                    f"{name}={value} exceeds the model's context of {self.engine.max_model_len} tokens",
                    name,
                    "context_length_exceeded",
                )
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # chat's default: as much as the context leaves
            max_tokens = max(1, self.engine.max_model_len - len(ids))
        params = _sampling_params(req, max_tokens)
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = Job(index=0, prompt_ids=ids, prompt_text=text, params=params, logprobs=top)
        return [self._checked(job, "messages")]


# ---- running jobs ---------------------------------------------------------------------------------------


class Running:
    """Admitted jobs: each one's output iterator, first output already in hand, and its timer."""

    def __init__(
        self,
        jobs: list[Job],
        gens: list[AsyncIterator[EngineOutput]],
        firsts: list[EngineOutput],
        timers: list[RequestTimer],
    ) -> None:
        self.jobs, self.gens, self.firsts, self.timers = jobs, gens, firsts, timers

    async def close(self, count_aborts: bool = True) -> None:
        """Closing an engine iterator aborts its request and frees its blocks (a no-op once it finished)."""
        if not count_aborts:
            for t in self.timers:
                t.done = True
        for g in self.gens:
            try:
                await g.aclose()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001, S110 - closing is best-effort; the engine aborts on its own
                pass
        for t in self.timers:
            t.finish("abort")  # no-op for jobs that finished normally


def _reject(metrics: ServerMetrics, status: int, message: str, code: str) -> APIError:
    metrics.rejected.labels(status=str(status)).inc()
    return APIError(status, message, code=code)


async def admit(engine: Any, metrics: ServerMetrics, request_id: str, jobs: list[Job]) -> Running:
    """Submit every job and wait for each one's first output (its admission and prefill)."""
    gens = [
        engine.generate(
            f"{request_id}-{j.index}", j.prompt_ids, j.params, logprobs=j.logprobs, prompt_logprobs=j.prompt_logprobs
        )
        for j in jobs
    ]
    timers = [metrics.timer() for _ in jobs]
    tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
    running = Running(jobs, gens, [], timers)
    try:
        firsts = list(await asyncio.gather(*tasks))
    except BaseException as exc:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # let each iterator unwind before closing it
        await running.close(count_aborts=False)  # never admitted: not an abort
        if isinstance(exc, EngineFullError):
            raise _reject(metrics, 429, f"server busy: {exc}; retry later", "engine_full") from exc
        if isinstance(exc, EngineStoppedError):
            raise _reject(metrics, 503, f"server not accepting requests: {exc}", "engine_stopped") from exc
        if isinstance(exc, PromptTooLongError):
            raise APIError(400, str(exc), "prompt", "context_length_exceeded") from exc
        if isinstance(exc, StopAsyncIteration):
            raise APIError(500, "the engine ended a request without any output") from exc
        raise
    running.firsts = firsts
    return running


async def outputs(running: Running) -> AsyncIterator[tuple[int, EngineOutput]]:
    """(job position, output) for every output of every job, the first ones first, in arrival order."""
    for k, first in enumerate(running.firsts):
        yield k, first
    live = [k for k, o in enumerate(running.firsts) if not o.finished]
    if len(live) == 1:  # the common case: no queue, no extra tasks
        k = live[0]
        async for out in running.gens[k]:
            yield k, out
        return
    if not live:
        return
    queue: asyncio.Queue[tuple[int, EngineOutput | None | BaseException]] = asyncio.Queue()

    async def pump(k: int) -> None:
        try:
            async for out in running.gens[k]:
                await queue.put((k, out))
            await queue.put((k, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((k, exc))

    tasks = [asyncio.ensure_future(pump(k)) for k in live]
    try:
        remaining = len(live)
        while remaining:
            k, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(running: Running) -> list[JobResult]:
    results = [JobResult(job) for job in running.jobs]
    try:
        async for k, out in outputs(running):
            results[k].add(out)
            running.timers[k].tokens(len(out.new_token_ids))
            if out.finished:
                running.timers[k].finish(out.finish_reason)
    finally:
        await running.close()
    for r in results:
        if r.error is not None or r.finish_reason not in ("stop", "length"):
            raise APIError(503, f"request aborted: {r.error or 'the engine ended it'}", code="request_aborted")
    return results


def _usage(results: Sequence[JobResult]) -> Usage:
    p = sum(r.num_prompt_tokens or len(r.job.prompt_ids) for r in results)
    c = sum(r.num_output_tokens for r in results)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


# ---- responses ------------------------------------------------------------------------------------------


def completion_response(
    request_id: str, model: str, req: CompletionRequest, results: list[JobResult], texts: TokenTexts
) -> CompletionResponse:
    choices = []
    for r in results:
        text, lp = r.text, None
        if req.echo:
            text = r.job.prompt_text + r.text
        if req.logprobs is not None:
            lp = CompletionLogprobs()
            offset = 0
            if req.echo:
                prompt_lps = r.prompt_logprobs or [None] * len(r.job.prompt_ids)
                offset = extend_completion_logprobs(lp, texts, r.job.prompt_ids, prompt_lps, 0)
            gen_lps: list[TokenLogprob | None] = list(r.logprobs) or [None] * len(r.token_ids)
            extend_completion_logprobs(lp, texts, r.token_ids, gen_lps, offset)
        choices.append(
            CompletionChoice(
                index=r.job.index,
                text=text,
                logprobs=lp,
                finish_reason=r.finish_reason,  # type: ignore[arg-type]
                stop_reason=r.stop_reason,
            )
        )
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=_usage(results))


def chat_response(
    request_id: str, model: str, req: ChatCompletionRequest, results: list[JobResult], texts: TokenTexts
) -> ChatCompletionResponse:
    choices = []
    for r in results:
        lp = chat_logprobs(texts, r.logprobs, req.top_logprobs or 0) if req.logprobs else None
        choices.append(
            ChatChoice(
                index=r.job.index,
                message=ChatResponseMessage(content=r.text),
                logprobs=lp,
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
            )  # type: ignore[arg-type]
        )
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=_usage(results))


# ---- server-sent events ---------------------------------------------------------------------------------


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _stream_error(message: str) -> bytes:
    err = APIError(503, f"request aborted: {message}", code="request_aborted")
    return sse(err.body())


async def stream_completion(
    request_id: str, model: str, req: CompletionRequest, running: Running, texts: TokenTexts
) -> AsyncIterator[bytes]:
    """SSE chunks of a streamed completion; the last is `data: [DONE]`. Closing it aborts the jobs."""
    results = [JobResult(job) for job in running.jobs]
    offsets = [0] * len(results)
    started = [False] * len(results)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        async for k, out in outputs(running):
            r, job = results[k], running.jobs[k]
            r.add(out)
            running.timers[k].tokens(len(out.new_token_ids))
            if out.finished:
                running.timers[k].finish(out.finish_reason)
                if out.error is not None or out.finish_reason not in ("stop", "length"):
                    yield _stream_error(out.error or "the engine ended it")
                    yield sse("[DONE]")
                    return
            text = "" if job.score_only else out.new_text
            new_ids = [] if job.score_only else out.new_token_ids
            lp: CompletionLogprobs | None = None
            if not started[k]:
                started[k] = True
                if req.echo:
                    text = job.prompt_text + text
                    if req.logprobs is not None:
                        lp = CompletionLogprobs()
                        prompt_lps = r.prompt_logprobs or [None] * len(job.prompt_ids)
                        offsets[k] = extend_completion_logprobs(lp, texts, job.prompt_ids, prompt_lps, 0)
            if req.logprobs is not None and new_ids:
                lp = lp or CompletionLogprobs()
                gen_lps: list[TokenLogprob | None] = list(out.new_logprobs or []) or [None] * len(new_ids)
                offsets[k] = extend_completion_logprobs(lp, texts, new_ids, gen_lps, offsets[k])
            if not text and lp is None and not out.finished:
                continue  # e.g. text held back while it may be the start of a stop string
            choice = CompletionChoice(
                index=job.index,
                text=text,
                logprobs=lp,
                finish_reason=r.finish_reason if out.finished else None,  # type: ignore[arg-type]
                stop_reason=r.stop_reason if out.finished else None,
            )
            chunk = CompletionResponse(id=request_id, model=model, choices=[choice])
            data = chunk.model_dump(mode="json")
            data.pop("usage")
            yield sse(data)
        if include_usage:
            chunk = CompletionResponse(id=request_id, model=model, choices=[], usage=_usage(results))
            yield sse(chunk.model_dump(mode="json"))
        yield sse("[DONE]")
    finally:
        await running.close()


async def stream_chat(
    request_id: str, model: str, req: ChatCompletionRequest, running: Running, texts: TokenTexts
) -> AsyncIterator[bytes]:
    results = [JobResult(job) for job in running.jobs]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choice: ChatChunkChoice | None, usage: Usage | None = None) -> bytes:
        c = ChatCompletionChunk(id=request_id, model=model, choices=[choice] if choice else [], usage=usage)
        data = c.model_dump(mode="json")
        for ch in data["choices"]:  # OpenAI sends only the delta's present fields (role first, then content)
            ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
        if not include_usage:
            data.pop("usage")
        return sse(data)

    try:
        for job in running.jobs:  # OpenAI's first chunk: the role, no content yet
            yield chunk(ChatChunkChoice(index=job.index, delta=ChatDelta(role="assistant", content="")))
        async for k, out in outputs(running):
            r, job = results[k], running.jobs[k]
            r.add(out)
            running.timers[k].tokens(len(out.new_token_ids))
            if out.finished:
                running.timers[k].finish(out.finish_reason)
                if out.error is not None or out.finish_reason not in ("stop", "length"):
                    yield _stream_error(out.error or "the engine ended it")
                    yield sse("[DONE]")
                    return
            lp = None
            if req.logprobs and out.new_logprobs:
                lp = chat_logprobs(texts, out.new_logprobs, req.top_logprobs or 0)
            if not out.new_text and lp is None and not out.finished:
                continue
            yield chunk(
                ChatChunkChoice(
                    index=job.index,
                    delta=ChatDelta(content=out.new_text) if out.new_text else ChatDelta(),
                    logprobs=lp,
                    finish_reason=r.finish_reason if out.finished else None,  # type: ignore[arg-type]
                    stop_reason=r.stop_reason if out.finished else None,
                )
            )
        if include_usage:
            yield chunk(None, _usage(results))
        yield sse("[DONE]")
    finally:
        await running.close()
