"""The scheduler: which requests run this step, and how many of their tokens. Pure Python, no model.

Each step it builds one batch under a token budget (`max_batched_tokens`):
1. every running sequence that is decoding gets one token (its last sampled one) and a KV slot for it; when
   the pool has no free block, the most recently admitted running sequence is preempted: its blocks are freed
   and it goes back to the front of the queue, to be recomputed later from its prompt and the tokens it has
   already produced (its sampler state is kept, so its output does not change);
2. sequences still prefilling get their next chunk (chunked prefill: a long prompt takes several steps, so
   running streams keep getting a token each step);
3. waiting sequences are admitted, oldest first, while there is budget, a running slot and free blocks; the
   prefix cache first hands them whatever full blocks of their prompt it already holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rapidlm.engine.kv_manager import BlockHash, KVCacheManager
from rapidlm.errors import ConfigError, EngineFullError


@dataclass
class SchedulerConfig:
    max_running: int = 16  # sequences in the running batch
    max_queued: int = 64  # sequences waiting for a slot; beyond running + queued, add() refuses
    max_batched_tokens: int = 256  # tokens computed per step (decode tokens + prefill chunks)

    def __post_init__(self) -> None:
        for name in ("max_running", "max_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SchedulerConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.max_queued, int) or isinstance(self.max_queued, bool) or self.max_queued < 0:
            raise ConfigError(f"SchedulerConfig.max_queued must be an int >= 0, got {self.max_queued!r}")
        if self.max_batched_tokens <= self.max_running:
            raise ConfigError(
                f"SchedulerConfig.max_batched_tokens must exceed max_running ({self.max_running}) so prefill "
                f"always gets budget, got {self.max_batched_tokens}"
            )


@dataclass(eq=False)
class SchedSeq:
    """What the scheduler knows of a request: its tokens, its blocks and how many positions are computed."""

    request_id: str
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt_tokens: int
    use_prefix_cache: bool = True  # off when every prompt position's logits are wanted (prompt logprobs)
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_computed: int = 0  # positions whose keys/values are in `blocks`
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache at first admission
    num_preemptions: int = 0
    finished: bool = False

    @property
    def prefill_target(self) -> int:
        """Positions to compute before decoding: the whole prompt for a new sequence (its last logits give the
        first token); for one resumed after preemption, everything but its last token, which decode feeds."""
        n = len(self.token_ids)
        return n if n == self.num_prompt_tokens else n - 1

    @property
    def decoding(self) -> bool:
        return len(self.token_ids) > self.num_prompt_tokens and self.num_computed == len(self.token_ids) - 1


@dataclass
class PrefillChunk:
    seq: SchedSeq
    start: int  # compute token_ids[start:end] at positions start..end-1
    end: int
    sample: bool  # the chunk ends the prompt of a new sequence: sample its first token from the last logits


@dataclass
class SchedulerOutput:
    decode: list[SchedSeq]  # one token each: token_ids[-1] at position len - 1
    prefill: list[PrefillChunk]
    preempted: list[SchedSeq]

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[SchedSeq] = deque()
        self.running: list[SchedSeq] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------------------------

    def fits(self, num_tokens: int) -> bool:
        """Could a sequence of `num_tokens` tokens ever run, alone in the whole pool?"""
        return self.kv.blocks_needed(num_tokens) <= self.kv.num_blocks

    def add(self, seq: SchedSeq) -> None:
        limit = self.config.max_running + self.config.max_queued
        if len(self.waiting) + len(self.running) >= limit:
            raise EngineFullError(f"the server is at capacity ({limit} requests running or queued); retry later")
        self.waiting.append(seq)

    def finish(self, seq: SchedSeq) -> None:
        """Retire a finished or aborted sequence and free its blocks (cached ones stay for the prefix cache)."""
        if seq.finished:
            return
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.release(seq.blocks)
        seq.blocks = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step -------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], [], [])
        for seq in list(self.running):
            if seq in self.running and seq.decoding and self._reserve(seq, len(seq.token_ids), out):
                out.decode.append(seq)
        budget = self.config.max_batched_tokens - len(out.decode)

        for seq in list(self.running):  # sequences part-way through their prefill
            if budget <= 0 or seq not in self.running or seq.decoding:
                continue
            end = min(seq.prefill_target, seq.num_computed + budget)
            if end > seq.num_computed and self._reserve(seq, end, out):
                out.prefill.append(PrefillChunk(seq, seq.num_computed, end, self._samples(seq, end)))
                budget -= end - seq.num_computed

        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            fresh = not seq.blocks
            if fresh and seq.use_prefix_cache:
                seq.blocks, seq.block_hashes = self.kv.match_prefix(seq.token_ids)
                seq.num_computed = len(seq.blocks) * self.kv.block_size
                if len(seq.token_ids) == seq.num_prompt_tokens and seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed
            end = min(seq.prefill_target, seq.num_computed + budget)
            if not self.kv.grow(seq.blocks, max(end, seq.num_computed)):
                if fresh:  # give the matched blocks back; they stay cached for this sequence's next try
                    self.kv.release(seq.blocks)
                    seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0
                break  # admission never preempts: the newcomer waits for blocks to free up
            self.waiting.popleft()
            self.running.append(seq)
            if end > seq.num_computed:
                out.prefill.append(PrefillChunk(seq, seq.num_computed, end, self._samples(seq, end)))
                budget -= end - seq.num_computed
        return out

    def on_computed(self, seq: SchedSeq, num_computed: int) -> None:
        """The model wrote positions up to `num_computed`; full blocks become shareable."""
        seq.num_computed = num_computed
        if seq.use_prefix_cache:
            self.kv.cache_full_blocks(seq.blocks, seq.block_hashes, seq.token_ids, num_computed)

    def append_token(self, seq: SchedSeq, token: int) -> None:
        seq.token_ids.append(token)

    # ---- internals ------------------------------------------------------------------------------------------

    @staticmethod
    def _samples(seq: SchedSeq, end: int) -> bool:
        return end == len(seq.token_ids) and len(seq.token_ids) == seq.num_prompt_tokens

    def _reserve(self, seq: SchedSeq, num_tokens: int, out: SchedulerOutput) -> bool:
        """Blocks for `num_tokens` positions of `seq`, preempting from the back of the running list as needed.
        A sequence already scheduled this step is never preempted. False if `seq` could not get its blocks
        (it was preempted itself, or the only candidates were already scheduled)."""
        while not self.kv.grow(seq.blocks, num_tokens):
            victim = self.running[-1]
            if victim is not seq and (victim in out.decode or any(c.seq is victim for c in out.prefill)):
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: SchedSeq) -> None:
        self.running.remove(seq)
        self.kv.release(seq.blocks)
        seq.blocks, seq.block_hashes, seq.num_computed = [], [], 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
