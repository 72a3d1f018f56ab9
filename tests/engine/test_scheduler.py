"""The scheduler on its own, without a model: admission, chunked prefill, budgets, preemption, limits."""

from __future__ import annotations

import pytest

from rapidlm.engine.kv_manager import KVCacheManager
from rapidlm.engine.scheduler import SchedSeq, Scheduler, SchedulerConfig
from rapidlm.errors import ConfigError, EngineFullError


def make(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, block_size))


def seq(rid: str, n: int, start: int = 0) -> SchedSeq:
    return SchedSeq(rid, list(range(start, start + n)), n)


def run_model(s: Scheduler, out, next_token: int = 7) -> None:
    """What the engine does after a forward: mark positions computed and append sampled tokens."""
    for q in out.decode:
        s.on_computed(q, len(q.token_ids))
        s.append_token(q, next_token)
    for c in out.prefill:
        s.on_computed(c.seq, c.end)
        if c.sample:
            s.append_token(c.seq, next_token)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="max_running"):
        SchedulerConfig(max_running=0)
    with pytest.raises(ConfigError, match="max_batched_tokens"):
        SchedulerConfig(max_running=16, max_batched_tokens=16)
    with pytest.raises(ConfigError, match="max_queued"):
        SchedulerConfig(max_queued=-1)


def test_prefill_then_decode():
    s = make()
    a = seq("a", 10)
    s.add(a)
    out = s.schedule()
    assert [(c.start, c.end, c.sample) for c in out.prefill] == [(0, 10, True)] and out.decode == []
    run_model(s, out)
    out = s.schedule()
    assert out.decode == [a] and out.prefill == []
    assert len(a.blocks) == 3  # 11 tokens with 4 per block


def test_chunked_prefill_keeps_decoding_running_streams():
    s = make(max_running=4, max_batched_tokens=8)
    a = seq("a", 3)
    s.add(a)
    run_model(s, s.schedule())  # a is decoding now
    b = seq("b", 20, start=100)
    s.add(b)
    chunks = []
    for _ in range(3):
        out = s.schedule()
        assert out.decode == [a]  # every step a still gets its token
        chunks += [(c.start, c.end, c.sample) for c in out.prefill]
        run_model(s, out)
    # 7 tokens of budget left per step after a's decode token: 20 prompt tokens take 3 chunks
    assert chunks == [(0, 7, False), (7, 14, False), (14, 20, True)]


def test_max_running_and_queue_limits():
    s = make(max_running=2, max_queued=1)
    for i in range(3):
        s.add(seq(str(i), 4, start=10 * i))
    with pytest.raises(EngineFullError, match="capacity"):
        s.add(seq("x", 4))
    out = s.schedule()
    assert len(out.prefill) == 2 and len(s.waiting) == 1  # the third waits for a running slot
    run_model(s, out)
    s.finish(s.running[0])
    out = s.schedule()
    assert any(c.seq.request_id == "2" for c in out.prefill)


def test_preemption_picks_the_newest_and_resumes_without_resampling():
    s = make(num_blocks=4, block_size=4, max_running=4, max_batched_tokens=64)
    a, b = seq("a", 4), seq("b", 4, start=50)
    s.add(a)
    s.add(b)
    run_model(s, s.schedule())  # both prefilled (1 block each) and sampled one token
    for _ in range(3):  # both grow into their second block: 4 blocks in use
        run_model(s, s.schedule())
    assert s.kv.num_free == 0
    for _ in range(4):  # a needs a third block at 9 tokens: b (admitted last) is preempted
        out = s.schedule()
        run_model(s, out)
        if out.preempted:
            break
    assert out.preempted == [b] and b.blocks == [] and b.num_computed == 0 and s.waiting[0] is b
    assert out.decode == [a]
    s.finish(a)
    out = s.schedule()  # b comes back: recompute all but its last token, which decode then feeds; no sampling
    (chunk,) = out.prefill
    # its first full block (the prompt) is still in the prefix cache, so recomputing starts at position 4
    assert chunk.seq is b and (chunk.start, chunk.end, chunk.sample) == (4, len(b.token_ids) - 1, False)
    run_model(s, out)
    assert s.schedule().decode == [b]


def test_prefix_cache_hit_on_admission():
    s = make(block_size=4)
    a = seq("a", 10)
    s.add(a)
    run_model(s, s.schedule())
    b = SchedSeq("b", list(range(10)) + [99, 98], 12)  # same first 10 tokens
    s.add(b)
    (chunk,) = s.schedule().prefill
    assert b.num_cached_tokens == 8 and chunk.start == 8 and b.blocks[:2] == a.blocks[:2]


def test_finish_frees_blocks_and_is_idempotent():
    s = make()
    a = seq("a", 9)
    s.add(a)
    run_model(s, s.schedule())
    s.finish(a)
    s.finish(a)
    assert s.kv.num_used == 0 and s.num_unfinished == 0


def test_fits():
    s = make(num_blocks=4, block_size=4)
    assert s.fits(16) and not s.fits(17)
