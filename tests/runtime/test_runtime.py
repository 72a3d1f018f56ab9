"""Runtime pieces: device/dtype resolution, the static KV cache, and the packed bf16 linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rapidlm import ConfigError, ModelConfig
from rapidlm.runtime.cpu_linear import PackedLinear, mkldnn_bf16_available, pack_linears
from rapidlm.runtime.device import resolve_device, resolve_dtype
from rapidlm.runtime.kv_cache import StaticKVCache

CFG = ModelConfig("LlamaForCausalLM", 100, 32, 64, num_layers=2, num_heads=4, num_kv_heads=2)


def test_resolve_device_and_dtype():
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("int3", cpu)
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")


def test_kv_cache_keep_moves_rows_to_front():
    cache = StaticKVCache(CFG, 3, 8, torch.float32, torch.device("cpu"))
    for row in range(3):
        cache.data[:, :, row] = row + 1
    cache.keep([2, 0])
    assert cache.batch_size == 2
    k, v = cache.layers()[0]
    assert k.shape == (2, 2, 8, 8)  # (B, n_kv, max_len, head_dim = 32 // 4)
    assert k[0].eq(3).all() and k[1].eq(1).all() and v[0].eq(3).all()


@pytest.mark.skipif(not mkldnn_bf16_available(), reason="oneDNN not available")
def test_packed_linear_is_bit_identical_to_f_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=True).to(torch.bfloat16)
    packed = PackedLinear(lin)
    for shape in [(1, 1, 96), (1, 37, 96), (3, 1, 96)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        with torch.inference_mode():
            assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))


def test_pack_linears_swaps_only_bf16_cpu_linears():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16), torch.nn.Linear(8, 8))
    swapped = pack_linears(model) if mkldnn_bf16_available() else 0
    assert swapped == (1 if mkldnn_bf16_available() else 0)
    assert type(model[1]) is torch.nn.Linear


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        ModelConfig("LlamaForCausalLM", 100, 32, 64, num_layers=2, num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="ModelConfig.vocab_size"):
        ModelConfig("LlamaForCausalLM", 0, 32, 64, num_layers=2, num_heads=4, num_kv_heads=2)
