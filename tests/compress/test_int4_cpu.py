"""The int4 kernel path against its dequantized reference."""

from __future__ import annotations

import pytest
import torch

from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight, int4_kernel_available


def random_int4(n: int, k: int, group: int = 32, seed: int = 0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offset = -torch.rand(n, k // group, generator=g) * 0.1
    return Int4Weight(q, scale, offset, group)


@pytest.mark.skipif(not int4_kernel_available(), reason="no int4 CPU kernel in this PyTorch")
@pytest.mark.parametrize("m", [1, 7, 64])
def test_int4_linear_matches_dequantized_matmul(m):
    w = random_int4(96, 128)
    bias = torch.randn(96)
    layer = Int4Linear(w, bias)
    x = torch.randn(1, m, 128).to(torch.bfloat16)
    expected = x.float() @ w.dequantize().T + bias
    with torch.inference_mode():
        got = layer(x).float()
    # bf16 activations, scales and output: error ~ bf16 epsilon (2^-8) relative to the output scale
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_cat_and_map_rows_act_on_codes_and_scales_together():
    a, b = random_int4(8, 64, seed=1), random_int4(4, 64, seed=2)
    both = Int4Weight.cat([a, b])
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    flipped = both.map_rows(lambda t: t.flip(0))
    torch.testing.assert_close(flipped.dequantize(), both.dequantize().flip(0))


def test_bad_group_size_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight(torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 48)


@pytest.mark.skipif(not int4_kernel_available(), reason="no int4 CPU kernel in this PyTorch")
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k,group", [(40, 64, 32), (7, 128, 64), (96, 256, 128)])
def test_int4_linear_odd_shapes_and_fp32_activations(m, n, k, group):
    w = random_int4(n, k, group, seed=n)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    expected = x.double() @ w.dequantize().double().T + bias.double()
    with torch.inference_mode():
        exact = Int4Linear(w, bias, act_dtype=torch.float32)(x)
        fast = Int4Linear(w, bias)(x)  # bf16 compute, cast back to fp32
    assert exact.shape == (m, n) and exact.dtype == torch.float32
    # fp32 scales and activations: only summation order differs
    torch.testing.assert_close(exact.double(), expected, rtol=1e-5, atol=1e-4)
    assert (fast.double() - expected).abs().max() <= 2e-2 * expected.abs().max()
