"""FLOP and byte counts against formulas derived by hand, and step_costs summed over a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rapidlm.config import ModelConfig
from rapidlm.models.llama import Transformer
from rapidlm.profile.costs import (
    STEP_KEYS,
    LinearSpec,
    ModelSpec,
    OpCost,
    attention_cost,
    linear_cost,
    linear_weight_format,
    norm_cost,
    rope_cost,
    step_costs,
    total,
)

# SmolLM2-135M's shapes: hidden 576, 9 query heads and 3 kv heads of 64, MLP 1536
C, H, HKV, D, INTER = 576, 9, 3, 64, 1536


def test_fp32_linear_decode():
    c = linear_cost(1, C, C, 32, 4)
    assert c.flops == 2 * C * C
    assert c.bytes == C * C * 4 + (C + C) * 4  # the weight once, x in, y out


def test_int4_g32_linear_counts_codes_and_fp16_scale_offset():
    n = C + 2 * HKV * D  # fused q|k|v: 960 outputs
    c = linear_cost(1, C, n, 4, 2, group_size=32, scale_bytes=4)
    codes = C * n // 2  # two 4-bit codes per byte
    scales = n * (C // 32) * (2 + 2)  # fp16 scale + fp16 offset per group of 32
    assert c.flops == 2 * C * n
    assert c.bytes == codes + scales + (C + n) * 2  # bf16 activations
    # ~5 bits per weight: 4 of code + 32 bits of scale/offset per 32 weights
    assert (codes + scales) * 8 / (C * n) == pytest.approx(5.0)


def test_int8_linears_per_channel_and_q8_0():
    per_channel = linear_cost(4, INTER, C, 8, 2, group_size=INTER, scale_bytes=4)
    assert per_channel.flops == 2 * 4 * INTER * C
    assert per_channel.bytes == INTER * C + C * 4 + 4 * (INTER + C) * 2
    q8_0 = linear_cost(1, C, 49152, 8, 2, group_size=32, scale_bytes=4)  # the tied head as GGUF stores it
    assert q8_0.bytes == C * 49152 * (1 + 4 / 32) + (C + 49152) * 2


def test_batch_reads_the_weight_once_and_bias_counts():
    one, eight = linear_cost(1, C, C, 16, 2), linear_cost(8, C, C, 16, 2)
    assert eight.flops == 8 * one.flops
    assert eight.bytes - one.bytes == 7 * (C + C) * 2  # only the activations grow
    with_bias = linear_cost(2, C, 960, 32, 4, bias=True)
    assert with_bias.flops == 2 * 2 * C * 960 + 2 * 960
    assert with_bias.bytes == linear_cost(2, C, 960, 32, 4).bytes + 960 * 4


def test_gqa_attention_decode_step():
    b, kv_len = 2, 100
    c = attention_cost(b, 1, kv_len, H, HKV, D, kv_bytes=4, act_bytes=4)
    assert c.flops == b * H * kv_len * (2 * D + 2 * D + 5)  # QK^T, PV, softmax per score
    q_out = 2 * H * D * 4  # q read, output written
    kv_read = 2 * kv_len * HKV * D * 4  # K and V, once per kv head
    kv_write = 2 * HKV * D * 4  # this step's k and v
    assert c.bytes == b * (q_out + kv_read + kv_write)
    # grouped-query: the same kv heads serve 3x the query heads for the same cache bytes
    mha = attention_cost(b, 1, kv_len, HKV, HKV, D, 4, 4)
    assert c.bytes - mha.bytes == b * 2 * (H - HKV) * D * 4
    assert c.flops == 3 * mha.flops


def test_attention_prefill_full_and_causal():
    t = 16
    full = attention_cost(1, t, t, H, HKV, D, 4, 2)
    causal = attention_cost(1, t, t, H, HKV, D, 4, 2, causal=True)
    assert full.flops == H * t * t * (4 * D + 5)
    assert causal.flops == H * (t * (t + 1) // 2) * (4 * D + 5)
    assert full.bytes == causal.bytes == 2 * t * H * D * 2 + 2 * t * HKV * D * 4 + 2 * t * HKV * D * 4
    # chunked prefill: 8 new tokens after 24 cached ones
    chunk = attention_cost(1, 8, 32, H, HKV, D, 4, 4, causal=True)
    assert chunk.flops == H * (8 * 24 + 8 * 9 / 2) * (4 * D + 5)


def test_norm_and_rope():
    assert norm_cost(3, C, 2) == OpCost(4 * 3 * C, (2 * 3 * C + C) * 2)
    elems = 5 * (H + HKV) * D
    assert rope_cost(5, H, HKV, D, 4) == OpCost(3 * elems, (2 * elems + 2 * 5 * D) * 4)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="in_features"):
        linear_cost(1, 0, 4, 16, 2)
    with pytest.raises(ValueError, match="kv_len"):
        attention_cost(1, 4, 2, 4, 2, 8, 4, 4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        attention_cost(1, 1, 2, 4, 3, 8, 4, 4)
    with pytest.raises(ValueError, match="OpCost.bytes"):
        OpCost(1.0, -1.0)
    assert OpCost(1, 2) + OpCost(3, 4) == OpCost(4, 6)
    assert OpCost(1, 2) * 3 == OpCost(3, 6) == 3 * OpCost(1, 2)


def test_linear_weight_format_of_each_module():
    from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight
    from rapidlm.compress.kernels.int8_cpu import Int8Linear, Int8Weight
    from rapidlm.compress.kernels.w8a8_cpu import W8A8Linear
    from rapidlm.runtime.cpu_linear import PackedLinear, mkldnn_bf16_available

    assert linear_weight_format(nn.Linear(64, 32)) == (32.0, None, 0)
    assert linear_weight_format(nn.Linear(64, 32).to(torch.bfloat16)) == (16.0, None, 0)
    if mkldnn_bf16_available():
        assert linear_weight_format(PackedLinear(nn.Linear(64, 32).to(torch.bfloat16))) == (16.0, None, 0)
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    exact = torch.full((32, 2), 0.5)  # fp16-exact scales (as GGUF's) are held as fp16: 2 + 2 bytes per group
    assert linear_weight_format(Int4Linear(Int4Weight(q, exact, -8 * exact, 32))) == (4.0, 32, 4)
    inexact = torch.full((32, 2), 0.1)  # fp32 scale + offset: 8 bytes per group
    assert linear_weight_format(Int4Linear(Int4Weight(q, inexact, -8 * inexact, 32))) == (4.0, 32, 8)
    q8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    assert linear_weight_format(Int8Linear(Int8Weight(q8, torch.rand(32, 2), 32))) == (8.0, 32, 4)
    bits, group, scale_bytes = linear_weight_format(W8A8Linear(q8, torch.rand(32)))
    assert (bits, group) == (8.0, 64) and scale_bytes in (4, 8)
    with pytest.raises(ValueError, match="unsupported module type"):
        linear_weight_format(nn.Conv1d(2, 2, 1))


def tiny_model(tied: bool = True) -> Transformer:
    cfg = ModelConfig("LlamaForCausalLM", 100, 32, 48, 3, 4, 2, tie_word_embeddings=tied)
    return Transformer(cfg, 64).eval()


@pytest.mark.parametrize("batch, q_len, kv_len", [(1, 1, 10), (3, 1, 7), (1, 6, 6)])
def test_step_costs_sum_hand_counts(batch, q_len, kv_len):
    model = tiny_model()
    costs = step_costs(model, batch, q_len, kv_len, act_bytes=4, kv_bytes=4)
    assert tuple(costs) == STEP_KEYS
    t, layers, a = batch * q_len, 3, 4
    qkv = linear_cost(t, 32, 32 + 2 * 2 * 8, 32, a)
    assert costs["qkv_proj"] == qkv * layers
    o = linear_cost(t, 32, 32, 32, a) + OpCost(t * 32, 3 * t * 32 * a)  # + the residual add
    assert costs["o_proj"] == o * layers
    mlp = linear_cost(t, 32, 96, 32, a) + OpCost(5 * t * 48, 3 * t * 48 * a) + linear_cost(t, 48, 32, 32, a)
    assert costs["mlp"] == (mlp + OpCost(t * 32, 3 * t * 32 * a)) * layers
    assert costs["attention"] == attention_cost(batch, q_len, kv_len, 4, 2, 8, 4, 4) * layers
    assert costs["rotary"] == rope_cost(t, 4, 2, 8, 4) * layers
    assert costs["norms"] == norm_cost(t, 32, a) * (2 * layers) + norm_cost(batch, 32, a)
    assert costs["head"] == linear_cost(batch, 32, 100, 32, a)  # last positions only
    assert costs["embedding"] == OpCost(0, t * 32 * (4 + a))
    assert total(costs).flops == sum(c.flops for c in costs.values())


def test_model_spec_counts_every_weight_byte_once():
    for tied in (True, False):
        model = tiny_model(tied)
        spec = ModelSpec.of(model)
        stored = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
        assert spec.weight_bytes == sum(stored.values())
        assert spec.params == sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
        assert step_costs(spec, 2, 1, 5, 4, 4) == step_costs(model, 2, 1, 5, 4, 4)
    assert LinearSpec(64, 32, "int4", 4, 32, 4).weight_bytes == 64 * 32 / 2 + 32 * 2 * 4
