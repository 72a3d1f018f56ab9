"""Native GGUF execution: the file's Q4_1 and Q8_0 blocks run as stored, with no loss against dequantizing."""

from __future__ import annotations

import pytest
import torch

from rapidlm import LLM
from rapidlm.compress.kernels.int4_cpu import Int4Linear, int4_kernel_available
from rapidlm.compress.kernels.int8_cpu import Int8Linear

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not int4_kernel_available(), reason="no int4 CPU kernel")]


def test_native_q4_1_and_q8_0_logits_equal_the_dequantized_reference(wikitext_lines):
    reference = LLM("smollm2-135m", device="cpu", dtype="float32", quantization="dequantized")
    native = LLM("smollm2-135m", device="cpu", dtype="float32", quantization="native")
    model = native.runner.model
    assert isinstance(model.layers[0].attn.wqkv, Int4Linear) and isinstance(model.layers[0].mlp.w_down, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)  # the tied Q8_0 token_embd, as the output head
    ids = reference.tokenizer.encode(" ".join(wikitext_lines[:8]), add_special_tokens=False)[:200]
    expected = reference.runner.score(ids)
    got = native.runner.score(ids)
    diff = float((got - expected).abs().max())
    # fp32 activations, exact fp16->fp32 scales: only summation order differs (measured ~1e-4).
    assert diff <= 1e-2, diff
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
