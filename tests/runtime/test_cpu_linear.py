"""DenseCopyLinear: a quantized linear with a bf16 copy for many-row inputs (prefill), and its runner wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rapidlm import LLM, SamplingParams
from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight
from rapidlm.errors import ConfigError
from rapidlm.runtime.cpu_linear import (
    DenseCopyLinear,
    _dequantized_weight,
    add_dense_copies,
    dense_copy_bytes,
    mkldnn_bf16_available,
)
from tests.helpers import save_hf_folder, tiny_hf_model

needs_bf16 = pytest.mark.skipif(not mkldnn_bf16_available(), reason="oneDNN bf16 linears unavailable")


def _int4_linear(n: int = 96, k: int = 128, seed: int = 0) -> Int4Linear:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    offset = -8 * scale
    return Int4Linear(Int4Weight(q, scale, offset, 32), torch.randn(n, generator=g), act_dtype=torch.bfloat16)


@needs_bf16
def test_dense_copy_routes_by_rows_and_matches_the_dequantized_weight():
    quantized = _int4_linear()
    weight = _dequantized_weight(quantized)
    layer = DenseCopyLinear(quantized, weight, min_rows=8)
    x_few = torch.randn(2, 3, 128).bfloat16()  # 6 rows: the quantized module, bit for bit
    assert torch.equal(layer(x_few), quantized(x_few))
    x_many = torch.randn(2, 4, 128).bfloat16()  # 8 rows: the bf16 copy
    expected = F.linear(x_many.float(), weight.bfloat16().float(), quantized.bias.bfloat16().float())
    got = layer(x_many)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 4, 96)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)  # bf16 output rounding
    # and the copy is the quantized module's function up to the weight's bf16 rounding
    torch.testing.assert_close(got.float(), quantized(x_many).float(), atol=5e-2, rtol=2e-2)
    assert layer(x_many.float()).dtype == torch.float32  # fp32 inputs never take the bf16 copy


@needs_bf16
def test_add_dense_copies_wraps_quantized_linears_with_their_thresholds():
    model = torch.nn.Module()
    model.proj = _int4_linear(seed=1)
    model.lm_head = _int4_linear(seed=2)
    model.plain = torch.nn.Linear(4, 4)
    assert dense_copy_bytes(model) == 2 * 2 * 96 * 128
    assert add_dense_copies(model, min_rows=64, head_min_rows=12) == 2
    assert isinstance(model.proj, DenseCopyLinear) and model.proj.min_elements == 64 * 128
    assert isinstance(model.lm_head, DenseCopyLinear) and model.lm_head.min_elements == 12 * 128
    assert type(model.plain) is torch.nn.Linear


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=3), tmp_path_factory.mktemp("tiny"))


@needs_bf16
def test_runner_option(tiny_folder):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    on = LLM(tiny_folder, dtype="bfloat16", quantization="int4-g32", dense_prefill="on")
    off = LLM(tiny_folder, dtype="bfloat16", quantization="int4-g32", dense_prefill="off")
    assert on.runner.dense_copies == 2 * 4 + 1  # 4 projections per layer and the head
    assert off.runner.dense_copies == 0
    assert not any(isinstance(m, DenseCopyLinear) for m in off.runner.model.modules())
    prompt = list(range(100, 180))  # 80 tokens: the prefill runs the copies
    assert len(on.generate(prompt, params)[0].token_ids) == 4
    fp32 = LLM(tiny_folder, dtype="float32", quantization="int4-g32", dense_prefill="on")
    assert fp32.runner.dense_copies == 0  # fp32 activations: nothing to copy for
    with pytest.raises(ConfigError, match="dense_prefill"):
        LLM(tiny_folder, dtype="bfloat16", dense_prefill="yes")
