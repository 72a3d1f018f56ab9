"""AsyncEngine: the step loop in its thread, streams to asyncio callers, limits, abort and drain."""

from __future__ import annotations

import asyncio

import pytest

from rapidlm import LLM, SamplingParams
from rapidlm.engine.async_engine import AsyncEngine, EngineConfig
from rapidlm.errors import EngineFullError, EngineStoppedError
from tests.helpers import save_hf_folder, tiny_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLM:
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path_factory.mktemp("tiny") / "m")
    return LLM(folder, device="cpu", dtype="float32")


@pytest.fixture
def engine(tiny):
    eng = AsyncEngine(tiny, EngineConfig(max_running=2, max_queued=1, block_size=4))
    eng.start()
    yield eng
    eng.shutdown()


async def collect(eng, rid, ids, params):
    return [o async for o in eng.generate(rid, ids, params)]


def test_concurrent_streams_equal_generate(tiny, engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [list(range(100 + 10 * i, 108 + 10 * i)) for i in range(3)]

    async def main():
        return await asyncio.gather(*[collect(engine, str(i), p, params) for i, p in enumerate(prompts)])

    results = asyncio.run(main())
    assert engine.ready
    for p, outs in zip(prompts, results):
        assert [t for o in outs for t in o.new_token_ids] == tiny.generate([p], params)[0].token_ids
        assert outs[-1].finished and outs[-1].finish_reason == "length"


def test_over_capacity_is_refused(engine):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def main():
        return await asyncio.gather(*[collect(engine, str(i), [5, 6, 7], params) for i in range(5)],
                                    return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, EngineFullError)]
    assert len(refused) == 2  # 2 running + 1 queued admitted
    assert all(len(r) == 30 for r in results if not isinstance(r, Exception))


def test_closing_the_stream_aborts_and_frees_blocks(engine):
    async def main():
        agen = engine.generate("long", list(range(50, 70)), SamplingParams(max_tokens=230, ignore_eos=True))
        async for out in agen:
            if out.num_output_tokens >= 3:
                break
        await agen.aclose()
        for _ in range(100):  # the abort is applied between steps
            if engine.stats().kv_blocks_used == 0 and engine.num_requests == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())


def test_drain_finishes_or_aborts_then_refuses(engine):
    async def main():
        short = await collect(engine, "s", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
        agen = engine.generate("l", [4, 5, 6], SamplingParams(max_tokens=250, ignore_eos=True))
        outs = [await agen.__anext__()]  # running now
        await engine.drain(timeout=0.0)  # no time left: what still runs is aborted with an error
        outs += [o async for o in agen]
        with pytest.raises(EngineStoppedError):
            await collect(engine, "late", [1], SamplingParams(max_tokens=1))
        return short, outs

    short, long = asyncio.run(main())
    assert short[-1].finish_reason == "length"
    assert long[-1].finish_reason == "abort" and "shut down" in long[-1].error
    assert engine.stats().kv_blocks_used == 0
