"""EngineCore (continuous batching on the paged cache) against LLM.generate and the full-sequence forward.

fp32 models throughout: there, batching, chunking, prefix reuse and preemption change logits by ~1e-6 at
most, so greedy and seeded outputs must be identical token for token (bf16 activations round those
differences into different tokens now and then; see docs/serving.md).
"""

from __future__ import annotations

import pytest
import torch

from rapidlm import LLM, SamplingParams
from rapidlm.engine.llm_engine import EngineConfig, EngineCore
from rapidlm.errors import ConfigError, EngineFullError, PromptTooLongError
from tests.helpers import save_hf_folder, tiny_hf_model

PROMPTS = [list(range(300, 305)), list(range(1000, 1037)), list(range(2000, 2013)), [5, 6, 7]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LLM:
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path_factory.mktemp("tiny") / "m")
    return LLM(folder, device="cpu", dtype="float32")


def run_all(core: EngineCore, requests, steps_between: int = 0) -> dict[str, list]:
    """Add requests (optionally stepping in between, so they join a running batch); run to completion."""
    got: dict[str, list] = {}

    def collect(outs):
        for o in outs:
            got.setdefault(o.request_id, []).append(o)

    for rid, ids, params, *extra in requests:
        core.add_request(rid, ids, params, *extra)
        for _ in range(steps_between):
            collect(core.step())
    while core.has_unfinished:
        collect(core.step())
    return got


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=20, ignore_eos=True),
])
def test_continuous_batching_equals_generate(tiny, params):
    expected = [tiny.generate([p], params)[0].token_ids for p in PROMPTS]
    core = EngineCore(tiny.runner, tiny.tokenizer, EngineConfig(max_batched_tokens=24, block_size=4))
    got = run_all(core, [(str(i), p, params) for i, p in enumerate(PROMPTS)], steps_between=2)
    assert [tokens(got[str(i)]) for i in range(len(PROMPTS))] == expected
    assert core.kv.num_used == 0


def test_forced_preemption_leaves_outputs_unchanged(tiny):
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)
    expected = [tiny.generate([p], params)[0].token_ids for p in PROMPTS]
    # 20 blocks of 4 tokens: the four sequences need up to 16 blocks each at the end, so they must preempt
    cfg = EngineConfig(kv_blocks=20, block_size=4, max_running=4, max_batched_tokens=16)
    core = EngineCore(tiny.runner, tiny.tokenizer, cfg)
    got = run_all(core, [(str(i), p, params) for i, p in enumerate(PROMPTS)], steps_between=1)
    assert core.stats().preemptions > 0
    assert [tokens(got[str(i)]) for i in range(len(PROMPTS))] == expected


def test_prefix_cache_reuses_blocks_and_keeps_outputs(tiny):
    system = list(range(400, 440))  # a shared 40-token "system prompt"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a, b = system + [11, 12, 13], system + [21, 22]
    core = EngineCore(tiny.runner, tiny.tokenizer, EngineConfig(block_size=8))
    first = run_all(core, [("a", a, params)])
    second = run_all(core, [("b", b, params)])
    assert first["a"][-1].num_cached_tokens == 0
    assert second["b"][-1].num_cached_tokens == 40  # 5 full blocks of the shared prefix
    assert core.stats().prefix_cache_hits == 40
    assert tokens(second["b"]) == tiny.generate([b], params)[0].token_ids


def test_logprobs_match_the_full_forward(tiny):
    prompt = list(range(700, 720))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    core = EngineCore(tiny.runner, tiny.tokenizer, EngineConfig(max_batched_tokens=32, block_size=4))
    outs = run_all(core, [("r", prompt, params, 3, 2)])["r"]
    generated = tokens(outs)
    full = torch.log_softmax(tiny.runner.score(prompt + generated), dim=-1)  # (T, V)
    prompt_lp = outs[0].prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(prompt)
    for i in range(1, len(prompt)):
        assert prompt_lp[i].token_id == prompt[i]
        assert prompt_lp[i].logprob == pytest.approx(full[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in prompt_lp[i].top] == full[i - 1].topk(2).indices.tolist()
    lps = [lp for o in outs for lp in o.new_logprobs]
    for j, lp in enumerate(lps):
        row = full[len(prompt) - 1 + j]
        assert lp.token_id == generated[j] and lp.logprob == pytest.approx(row[generated[j]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
        assert lp.top[0][0] == generated[j]  # greedy picked the best


def test_stop_strings_and_streamed_text(tiny):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = tiny.generate([PROMPTS[1]], params)[0]
    stop = ref.text[5:8]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    expected = tiny.generate([PROMPTS[1]], sp)[0]
    core = EngineCore(tiny.runner, tiny.tokenizer)
    outs = run_all(core, [("s", PROMPTS[1], sp)])["s"]
    assert "".join(o.new_text for o in outs) == expected.text
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop


def test_abort_frees_blocks(tiny):
    core = EngineCore(tiny.runner, tiny.tokenizer)
    core.add_request("x", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    core.step()
    core.step()
    assert core.kv.num_used > 0
    out = core.abort("x")
    assert out.finished and out.finish_reason == "abort"
    assert core.kv.num_used == 0 and not core.has_unfinished
    assert core.abort("x") is None


def test_request_checks(tiny):
    core = EngineCore(tiny.runner, tiny.tokenizer, EngineConfig(kv_blocks=4, block_size=4, max_running=1, max_queued=0,
                                                                max_batched_tokens=8))
    with pytest.raises(PromptTooLongError, match="empty"):
        core.add_request("a", [], SamplingParams())
    with pytest.raises(PromptTooLongError, match="context"):
        core.add_request("a", [1] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(PromptTooLongError, match="KV blocks"):
        core.add_request("a", [1] * 10, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        core.add_request("a", [10**9], SamplingParams(max_tokens=1))
    core.add_request("a", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(EngineFullError):
        core.add_request("b", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ConfigError, match="kv_blocks"):
        EngineConfig(kv_blocks=0)


@pytest.mark.slow
def test_default_model_batched_equals_generate(llm_fp32):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    core = EngineCore(llm_fp32.runner, llm_fp32.tokenizer, EngineConfig(kv_blocks=12, block_size=4))
    reqs = [(str(i), llm_fp32.tokenizer.encode(p), params) for i, p in enumerate(prompts)]
    got = run_all(core, reqs, steps_between=1)
    assert core.stats().preemptions > 0  # 12 blocks of 4 tokens cannot hold all three: some were preempted
    for i, p in enumerate(prompts):
        ref = llm_fp32.generate(p, params)[0]
        assert tokens(got[str(i)]) == ref.token_ids
        assert "".join(o.new_text for o in got[str(i)]) == ref.text


def test_kv_cache_dtype(tiny):
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")
    auto = EngineCore(tiny.runner, tiny.tokenizer, EngineConfig(kv_blocks=8))
    assert auto.cache.storage_dtype == torch.float32  # an fp32 model keeps an fp32 pool (exact outputs)
    bf16 = EngineCore(tiny.runner, tiny.tokenizer, EngineConfig(kv_blocks=8, kv_cache_dtype="bfloat16"))
    assert bf16.cache.storage_dtype == torch.bfloat16 and bf16.cache.dtype == torch.float32
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = run_all(bf16, [("r", PROMPTS[1], params)])["r"]
    assert len(tokens(outs)) == 6 and bf16.kv.num_used == 0


def test_flat_steps_give_the_outputs_of_separate_forwards(tmp_path):
    """One forward per step (decode rows + prompt chunks) against a forward per batch and chunk: the same tokens
    and logprobs, on a bf16 model with 4-bit weights and bf16 copies (whose rows are bit-identical either way)."""
    from rapidlm.runtime.cpu_linear import mkldnn_bf16_available

    if not mkldnn_bf16_available():
        pytest.skip("oneDNN bf16 linears unavailable")
    with pytest.raises(ConfigError, match="flat_steps"):
        EngineConfig(flat_steps="yes")
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=6), tmp_path / "m")
    llm = LLM(folder, dtype="bfloat16", quantization="int4-g32", dense_prefill="on")
    prompts = PROMPTS + [list(range(3000, 3090)), list(range(500, 503))]  # a 90-token prompt runs the copies
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = {}
    for flat in (True, False):
        core = EngineCore(llm.runner, llm.tokenizer, EngineConfig(max_batched_tokens=64, block_size=4, flat_steps=flat))
        assert core.flat is flat
        reqs = [(str(i), p, params, 3) for i, p in enumerate(prompts)]  # logprobs: 3 alternatives
        runs[flat] = run_all(core, reqs, steps_between=1)
        assert core.kv.num_used == 0
    for rid, outs in runs[True].items():
        assert tokens(outs) == tokens(runs[False][rid])
        assert [o.new_logprobs for o in outs] == [o.new_logprobs for o in runs[False][rid]]
