"""End to end through rapidlm.LLM on the real default model, against transformers where it applies."""

from __future__ import annotations

import pytest
import torch

from rapidlm import LLM, PromptTooLongError, SamplingParams
from tests.helpers import save_hf_folder, tiny_hf_model

GREEDY32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
PROMPTS = [
    "The history of the city of Rome begins",
    "def fibonacci(n):",
    "Q: What is the boiling point of water?\nA:",
]


@pytest.mark.slow
def test_greedy_tokens_identical_to_transformers(llm_fp32, hf_reference):
    for prompt in PROMPTS:
        ids = llm_fp32.tokenizer.encode(prompt)
        with torch.inference_mode():
            ref = hf_reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
            )[0, len(ids) :].tolist()
        out = llm_fp32.generate(prompt, GREEDY32)[0]
        assert out.token_ids == ref, prompt
        assert out.text == llm_fp32.tokenizer.decode(ref)


@pytest.mark.parametrize("which", ["llm_fp32", "llm_auto"])
def test_batch_equals_single(request, which):
    llm = request.getfixturevalue(which)
    params = [
        GREEDY32,
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0.8, seed=5, max_tokens=20),
    ]
    batched = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batched):
        alone = llm.generate(prompt, p)[0]
        assert out.token_ids == alone.token_ids and out.text == alone.text, prompt
        assert out.finish_reason == alone.finish_reason


def test_seeded_sampling_is_reproducible(llm_auto):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24)
    a, b = (llm_auto.generate("Once upon a time", p)[0] for _ in range(2))
    assert a.token_ids == b.token_ids
    other = llm_auto.generate("Once upon a time", SamplingParams(temperature=1.0, seed=99, max_tokens=24))[0]
    assert other.token_ids != a.token_ids


@pytest.mark.parametrize("stop", [[], ["\n"], [" the", "."]])
def test_stream_concatenation_equals_generate(llm_auto, stop):
    p = SamplingParams(temperature=0, max_tokens=40, stop=stop)
    final = llm_auto.generate(PROMPTS[0], p)[0]
    chunks = list(llm_auto.stream(PROMPTS[0], p))
    assert "".join(c.text for c in chunks) == final.text
    assert chunks[-1].finish_reason == final.finish_reason and chunks[-1].output.text == final.text
    assert all(c.output is None for c in chunks[:-1])


def test_stop_string_truncates_and_reports(llm_auto):
    free = llm_auto.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40))[0].text
    word = free.split()[3]
    out = llm_auto.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, stop=[word]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == word
    assert out.text == free[: free.index(word)]


def test_finish_reasons_and_metrics(llm_auto):
    out = llm_auto.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    m = out.metrics
    assert m.prompt_tokens == len(llm_auto.tokenizer.encode("Hello")) and m.output_tokens == 5
    assert 0 < m.time_to_first_token_s and m.decode_tokens_per_s > 0 and m.prefill_tokens_per_s > 0
    chat = llm_auto.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=64))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm_auto.tokenizer.eos_token_ids
    assert chat.text and "<|im_end|>" not in chat.text


def test_stop_token_ids(llm_auto):
    first = llm_auto.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10))[0].token_ids
    out = llm_auto.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[first[2]]))[0]
    assert out.token_ids == first[:3] and out.outputs[0].stop_reason == first[2]


def test_prompt_longer_than_context(llm_auto):
    with pytest.raises(PromptTooLongError, match="context holds 8192"):
        llm_auto.generate([[100] * 9000], SamplingParams(max_tokens=1))
    with pytest.raises(PromptTooLongError, match="empty"):
        llm_auto.generate("", SamplingParams(max_tokens=1))


def test_generation_stops_at_the_context_limit(tmp_path):
    ref = tiny_hf_model("LlamaForCausalLM", max_position_embeddings=32)
    llm = LLM(save_hf_folder(ref, tmp_path / "m"), device="cpu", dtype="float32")
    out = llm.generate([list(range(100, 120))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 32 - 20


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_hf_folder_greedy_matches_transformers(tmp_path, arch):
    ref = tiny_hf_model(arch, tie_word_embeddings=arch != "Qwen2ForCausalLM")
    llm = LLM(save_hf_folder(ref, tmp_path / arch), device="cpu", dtype="float32")
    ids = list(range(1000, 1012))
    with torch.inference_mode():
        expected = ref.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, 12, dtype=torch.long),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
        )[0, 12:].tolist()
    got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    assert got == expected


def test_bad_prompt_types(llm_auto):
    with pytest.raises(TypeError, match="prompts\\[1\\]"):
        llm_auto.generate(["ok", 3.5])
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm_auto.generate("x", [SamplingParams(), SamplingParams()])
