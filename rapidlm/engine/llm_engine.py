"""The continuous-batching engine core: requests join and leave the running batch between steps.

`EngineCore.step()` asks the scheduler for this step's work, runs one decode forward for every decoding
sequence (one token each, paged KV cache) and one forward per prefill chunk, samples, and returns what each
request gained. It is synchronous and single-threaded; rapidlm.engine.async_engine runs it in a thread for
the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rapidlm.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from rapidlm.engine.kv_manager import KVCacheManager
from rapidlm.engine.outputs import EngineOutput, EngineStats, TokenLogprob
from rapidlm.engine.request import Sequence
from rapidlm.engine.sampling import SamplingParams, SequenceSampler, sample_batch
from rapidlm.engine.scheduler import PrefillChunk, SchedSeq, Scheduler, SchedulerConfig, SchedulerOutput
from rapidlm.errors import ConfigError, PromptTooLongError
from rapidlm.loading.tokenizer import Tokenizer
from rapidlm.runtime.model_runner import ModelRunner
from rapidlm.runtime.paged_kv import PagedKVCache

MAX_LOGPROBS = 20
KV_CACHE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class EngineConfig:
    max_running: int = 16  # sequences decoded together
    max_queued: int = 64  # requests waiting for a running slot; more are refused (HTTP 429)
    kv_blocks: int | None = None  # KV pool size in blocks; None: as many as kv_cache_bytes holds
    block_size: int = 16  # tokens per KV block
    # Tokens per step: decode tokens plus prefill chunks (vLLM's max_num_batched_tokens). Larger steps split fewer
    # prompts (a split-off remnant under 64 rows runs the slower 4-bit kernel, under 12 the row-by-row attention)
    # but stall running streams longer: a throughput/latency trade-off (docs/serving.md has the numbers). 256
    # keeps a step with 16 streams near 0.2 s on 2 CPU cores.
    max_batched_tokens: int = 256
    enable_prefix_caching: bool = True
    kv_cache_bytes: int = 1 << 30  # pool budget when kv_blocks is None
    # What the KV pool stores. "auto": bf16 when the model computes in bf16 (keys/values come out of bf16
    # projections; values are exact in bf16, keys are rounded once after RoPE), else the attention dtype.
    kv_cache_dtype: str = "auto"
    # One forward per step for decode rows and prompt chunks together, where the runner allows it (the CPU's
    # paged kernel); False: a forward for the decode batch and one per prompt chunk. Same outputs either way.
    flat_steps: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.flat_steps, bool):
            raise ConfigError(f"EngineConfig.flat_steps must be a bool, got {self.flat_steps!r}")
        for name in ("block_size", "kv_cache_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"EngineConfig.{name} must be an int >= 1, got {value!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"EngineConfig.kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        if self.kv_blocks is not None and (
            not isinstance(self.kv_blocks, int) or isinstance(self.kv_blocks, bool) or self.kv_blocks < 1
        ):
            raise ConfigError(f"EngineConfig.kv_blocks must be an int >= 1 or None, got {self.kv_blocks!r}")
        self.scheduler  # validates max_running, max_queued, max_batched_tokens  # noqa: B018

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_running, self.max_queued, self.max_batched_tokens)


@dataclass(eq=False)
class _Request:
    seq: Sequence  # sampling, detokenization and stop state
    sched: SchedSeq  # what the scheduler sees
    logprobs: int | None
    prompt_logprobs: int | None
    prompt_lp: list[TokenLogprob | None] | None = None  # filled position by position during prefill
    sent_first: bool = False


class EngineCore:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.runner, self.tokenizer = runner, tokenizer
        self.config = config = config or EngineConfig()
        storage = KV_CACHE_DTYPES[config.kv_cache_dtype]
        if storage is None:  # auto
            storage = torch.bfloat16 if runner.dtype == torch.bfloat16 else runner.kv_dtype
        num_blocks = config.kv_blocks
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(runner.cfg, config.block_size, storage)
            wanted = config.max_running * -(-runner.max_seq_len // config.block_size)
            num_blocks = max(1, min(wanted, config.kv_cache_bytes // per_block))
        self.cache = runner.allocate_paged(num_blocks, config.block_size, storage_dtype=storage)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.flat = config.flat_steps and runner.flat_ok(self.cache)  # one forward per step (see _step_flat)
        self.requests: dict[str, _Request] = {}
        self.prompt_tokens = self.generation_tokens = self.steps = 0

    @property
    def max_model_len(self) -> int:
        return self.runner.max_seq_len

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- requests -----------------------------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Everything that can be said about a request before admission: raises with the reason."""
        if not prompt_ids:
            raise PromptTooLongError("the prompt is empty: it encodes to no tokens")
        vocab = self.runner.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: {total} tokens "
                f"do not fit in the model's context of {self.max_model_len}"
            )
        if not self.scheduler.fits(total):
            raise PromptTooLongError(
                f"{total} tokens (prompt + max_tokens) need {self.kv.blocks_needed(total)} KV blocks but the "
                f"whole pool has {self.kv.num_blocks}"
            )

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        for name, n in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {n}")
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_request(prompt_ids, params)
        seq = Sequence(
            request_id=request_id,
            index=0,
            prompt=None,
            prompt_ids=prompt_ids,
            params=params,
            sampler=SequenceSampler(params, prompt_ids, self.runner.cfg.vocab_size, self.runner.device),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
            stops=StopStringMatcher(params.stop),
            max_len=len(prompt_ids) + params.max_tokens,
        )
        # Prompt logprobs need logits at every prompt position, so such a request computes its whole prompt.
        sched = SchedSeq(request_id, list(prompt_ids), len(prompt_ids), use_prefix_cache=prompt_logprobs is None)
        self.scheduler.add(sched)  # raises EngineFullError when running + queued is at its bound
        req = _Request(seq, sched, logprobs, prompt_logprobs)
        if prompt_logprobs is not None:
            req.prompt_lp = [None] * len(prompt_ids)
        self.requests[request_id] = req

    def abort(self, request_id: str, error: str | None = None) -> EngineOutput | None:
        """Stop a request and free its blocks; its final output (finish_reason "abort"), or None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.finish(req.sched)
        req.seq.finish_reason = "abort"
        return self._output(req, [], "", None, error)

    def abort_all(self, error: str) -> list[EngineOutput]:
        return [out for rid in list(self.requests) if (out := self.abort(rid, error)) is not None]

    # ---- one step -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        self.steps += 1
        if self.flat and plan.prefill and (plan.decode or len(plan.prefill) > 1):
            if not any(self.requests[c.seq.request_id].prompt_lp is not None for c in plan.prefill):
                return self._step_flat(plan)
        outputs: list[EngineOutput] = []
        if plan.decode:
            logits = self.runner.forward_paged(
                self.cache,
                [[s.token_ids[-1]] for s in plan.decode],
                [len(s.token_ids) - 1 for s in plan.decode],
                [s.blocks for s in plan.decode],
            )[:, -1]  # (B, V)
            outputs += self._decoded(plan.decode, logits)
        for chunk in plan.prefill:
            req, s = self.requests[chunk.seq.request_id], chunk.seq
            want_prompt_lp = req.prompt_lp is not None and chunk.start < s.num_prompt_tokens
            logits = self.runner.forward_paged(
                self.cache, [s.token_ids[chunk.start : chunk.end]], [chunk.start], [s.blocks], all_logits=want_prompt_lp
            )[0]  # (T or 1, V)
            if want_prompt_lp:
                self._fill_prompt_logprobs(req, logits, chunk.start, chunk.end)
            outputs += self._prefilled(chunk, logits[-1:])
        return outputs

    def _step_flat(self, plan: SchedulerOutput) -> list[EngineOutput]:
        """The step as one forward: decode rows and prompt chunks laid end to end (vLLM v1's one flat batch per
        step), instead of a forward for the decode batch and one per chunk: each forward costs ~10 ms of fixed
        work on the CPU whatever its size. Same outputs as the separate forwards (ModelRunner.forward_flat)."""
        chunks = plan.prefill
        logits = self.runner.forward_flat(
            self.cache,
            [[s.token_ids[-1]] for s in plan.decode] + [c.seq.token_ids[c.start : c.end] for c in chunks],
            [len(s.token_ids) - 1 for s in plan.decode] + [c.start for c in chunks],
            [s.blocks for s in plan.decode] + [c.seq.blocks for c in chunks],
            n_decode=len(plan.decode),
            want_logits=[c.sample for c in chunks],
        )  # (B + sampled chunks, V)
        B = len(plan.decode)
        outputs = self._decoded(plan.decode, logits[:B]) if B else []
        row = B
        for chunk in chunks:
            outputs += self._prefilled(chunk, logits[row : row + 1])
            row += chunk.sample
        return outputs

    def _decoded(self, seqs: list[SchedSeq], logits: torch.Tensor) -> list[EngineOutput]:
        """After a forward: the decoding sequences' next tokens from their logits (B, V)."""
        reqs = [self.requests[s.request_id] for s in seqs]
        for s in seqs:
            self.scheduler.on_computed(s, len(s.token_ids))
        tokens = sample_batch(logits, [r.seq.sampler for r in reqs]).tolist()
        lps = self._token_logprobs(logits, tokens, [r.logprobs for r in reqs])
        return [self._emit(r, t, lp) for r, t, lp in zip(reqs, tokens, lps)]

    def _prefilled(self, chunk: PrefillChunk, last: torch.Tensor) -> list[EngineOutput]:
        """After a forward: a prompt chunk is in the cache; one that ends its prompt samples the first token from
        `last`, the logits of its last position (1, V)."""
        req, s = self.requests[chunk.seq.request_id], chunk.seq
        self.scheduler.on_computed(s, chunk.end)
        if s.num_preemptions == 0:
            self.prompt_tokens += chunk.end - chunk.start
        if not chunk.sample:
            return []
        token = int(req.seq.sampler.sample(last[0]))
        lp = self._token_logprobs(last, [token], [req.logprobs])[0]
        return [self._emit(req, token, lp)]

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.kv.num_used,
            kv_blocks_total=self.kv.num_blocks,
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            steps=self.steps,
        )

    # ---- internals ----------------------------------------------------------------------------------------

    def _emit(self, req: _Request, token: int, lp: TokenLogprob | None) -> EngineOutput:
        seq = req.seq
        seq.append(token, self.tokenizer.eos_token_ids)
        self.scheduler.append_token(req.sched, token)
        self.generation_tokens += 1
        if seq.finished:
            self.requests.pop(seq.request_id, None)
            self.scheduler.finish(req.sched)
        return self._output(req, [token], seq.take_delta(), [lp] if lp is not None else None)

    def _output(
        self, req: _Request, tokens: list[int], text: str, lps: list[TokenLogprob] | None, error: str | None = None
    ) -> EngineOutput:
        seq = req.seq
        prompt_lp = None
        if not req.sent_first:
            req.sent_first = True
            prompt_lp = req.prompt_lp
        return EngineOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_text=text,
            new_logprobs=lps,
            prompt_logprobs=prompt_lp,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            num_cached_tokens=req.sched.num_cached_tokens,
            error=error,
        )

    @staticmethod
    def _token_logprobs(
        logits: torch.Tensor, tokens: list[int], wants: list[int | None]
    ) -> list[TokenLogprob | None]:
        """Logprob of each row's chosen token and its top alternatives, for the rows that asked."""
        if all(n is None for n in wants):
            return [None] * len(tokens)
        rows = [i for i, n in enumerate(wants) if n is not None]
        lp = torch.log_softmax(logits[rows].float(), dim=-1)  # (R, V)
        k = max(wants[i] or 0 for i in rows)
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        out: list[TokenLogprob | None] = [None] * len(tokens)
        for j, i in enumerate(rows):
            n = wants[i] or 0
            top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())) if n else []
            out[i] = TokenLogprob(tokens[i], float(lp[j, tokens[i]]), top)
        return out

    @staticmethod
    def _fill_prompt_logprobs(req: _Request, logits: torch.Tensor, start: int, end: int) -> None:
        """Logits at positions start..end-1 score prompt tokens start+1..end (those inside the prompt)."""
        prompt = req.sched.token_ids[: req.sched.num_prompt_tokens]
        last = min(end, len(prompt) - 1)  # position whose logits score the last prompt token, + 1
        if last <= start:
            return
        n = req.prompt_logprobs or 0
        lp = torch.log_softmax(logits[: last - start].float(), dim=-1)  # (P, V)
        targets = torch.tensor(prompt[start + 1 : last + 1], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        top_v, top_i = lp.topk(n, dim=-1) if n else (None, None)
        for j in range(last - start):
            top = list(zip(top_i[j].tolist(), top_v[j].tolist())) if n else []
            req.prompt_lp[start + 1 + j] = TokenLogprob(prompt[start + 1 + j], chosen[j], top)
