"""rapidlm's model vs transformers on tiny random checkpoints of every supported family (fp32)."""

from __future__ import annotations

import pytest
import torch

from rapidlm.loading import load_model
from rapidlm.runtime.kv_cache import StaticKVCache
from tests.helpers import save_hf_folder, tiny_hf_model

# Tiny random models: both sides compute the same fp32 math, so only summation order differs.
ATOL = 2e-5

CASES = {
    "llama-gqa-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama-mha-untied": ("LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3-rope-scaling": (
        "LlamaForCausalLM",
        dict(
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            rope_theta=500000.0,
        ),
    ),
    "mistral-sliding-window": ("MistralForCausalLM", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
}


def full_logits(model, ids: list[int]) -> torch.Tensor:
    cache = StaticKVCache(model.cfg, 1, len(ids), torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache.layers(), len(ids))[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    arch, overrides = CASES[case]
    ref = tiny_hf_model(arch, **overrides)
    folder = save_hf_folder(ref, tmp_path / case, with_tokenizer=False)
    loaded = load_model(folder, dtype=torch.float32, with_tokenizer=False)
    assert loaded.config.architecture == arch
    ids = torch.randint(0, ref.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    got = full_logits(loaded.model, ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-gqa-tied", "mistral-sliding-window", "qwen2-qkv-bias"])
def test_incremental_decode_matches_full_forward(case, tmp_path):
    """Prefill then one token at a time through the KV cache gives the same logits as one full pass."""
    arch, overrides = CASES[case]
    ref = tiny_hf_model(arch, **overrides)
    loaded = load_model(save_hf_folder(ref, tmp_path / case, with_tokenizer=False), with_tokenizer=False)
    model = loaded.model
    ids = list(range(100, 124))
    full = full_logits(model, ids)
    cache = StaticKVCache(model.cfg, 1, len(ids), torch.float32, torch.device("cpu"))
    steps = []
    with torch.inference_mode():
        steps.append(model(torch.tensor([ids[:10]]), torch.arange(10)[None], cache.layers(), 10)[0, -1])
        for pos in range(10, len(ids)):
            out = model(torch.tensor([[ids[pos]]]), torch.tensor([[pos]]), cache.layers(), pos + 1)
            steps.append(out[0, -1])
    torch.testing.assert_close(torch.stack(steps), full[9:], atol=ATOL, rtol=0)
