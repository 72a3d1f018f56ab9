"""CUDA paths: run only where a GPU is present (skipped on CPU-only machines and in CI)."""

from __future__ import annotations

import pytest
import torch

from rapidlm import LLM, SamplingParams
from tests.helpers import save_hf_folder, tiny_hf_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2), ("float16", 5e-3)])
def test_cuda_logits_close_to_cpu_fp32(tmp_path, dtype, tol):
    ref = tiny_hf_model("Qwen2ForCausalLM", tie_word_embeddings=False)
    folder = save_hf_folder(ref, tmp_path / "m")
    cpu = LLM(folder, device="cpu", dtype="float32")
    gpu = LLM(folder, device="cuda", dtype=dtype)
    ids = list(range(500, 540))
    a = cpu.runner.prefill(cpu.runner.allocate(1, 64), 0, ids)
    b = gpu.runner.prefill(gpu.runner.allocate(1, 64), 0, ids).cpu()
    assert (a - b).abs().max() <= tol * a.abs().max()


def test_cuda_batch_equals_single(tmp_path):
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m")
    llm = LLM(folder, device="cuda", dtype="float32")
    prompts = [list(range(100, 110)), list(range(200, 230))]
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batched = llm.generate(prompts, p)
    for prompt, out in zip(prompts, batched):
        assert out.token_ids == llm.generate([prompt], p)[0].token_ids
