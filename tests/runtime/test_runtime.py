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
    k, v = cache.layers()[0].k, cache.layers()[0].v
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


@pytest.mark.slow
def test_compiled_decode_matches_eager(tmp_path):
    """compile=True is a speed option only: on an fp32 model it gives the eager tokens and logits."""
    from rapidlm import LLM, SamplingParams
    from tests.helpers import save_hf_folder, tiny_hf_model

    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m")
    eager = LLM(folder, device="cpu", dtype="float32")
    compiled = LLM(folder, device="cpu", dtype="float32", compile=True)
    assert compiled.runner.compiled_decode is not None
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = list(range(700, 710))
    assert compiled.generate([ids], p)[0].token_ids == eager.generate([ids], p)[0].token_ids
    cache_e, cache_c = eager.runner.allocate(1, 16), compiled.runner.allocate(1, 16)
    eager.runner.prefill(cache_e, 0, ids)
    compiled.runner.prefill(cache_c, 0, ids)
    token, pos = torch.tensor([5]), torch.tensor([10])
    torch.testing.assert_close(
        compiled.runner.decode(cache_c, token, pos, 11),
        eager.runner.decode(cache_e, token, pos, 11),
        atol=1e-5,
        rtol=0,
    )
