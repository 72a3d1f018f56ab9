"""W8A8 dynamic linear: fbgemm path against the float reference of the same arithmetic."""

from __future__ import annotations

import pytest
import torch

from rapidlm.compress.kernels.w8a8_cpu import W8A8Linear, fbgemm_available


def random_layer(n: int, k: int, bias: bool, seed: int = 0) -> W8A8Linear:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    return W8A8Linear(q, scale, torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(13, 40), (96, 64), (576, 1536)])
def test_w8a8_matches_float_reference(m, n, k):
    layer = random_layer(n, k, bias=n == 13)
    x = torch.randn(m, k) * torch.logspace(-1, 1, m)[:, None]  # rows of very different ranges: per-token scales
    with torch.inference_mode():
        got = layer(x)
        ref = layer.reference(x)
        exact = x.double() @ (layer.q.double() * layer.scale.double()[:, None]).T
        if layer.bias is not None:
            exact += layer.bias.double()
    assert got.shape == (m, n)
    # Both quantize activations to 8 bits (fbgemm: 7 without VNNI), so each is within a few % of exact, per row.
    for out in (got, ref):
        err = (out.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
        assert (err < 0.03).all(), err


def test_w8a8_bf16_input_and_3d_shape():
    layer = random_layer(32, 64, bias=True)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (2, 5, 32) and y.dtype == torch.bfloat16


def test_w8a8_validation():
    with pytest.raises(ValueError, match="int8"):
        W8A8Linear(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        W8A8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))


def test_fbgemm_is_used_here():
    if not fbgemm_available():
        pytest.skip("this PyTorch has no fbgemm")
    assert "fbgemm" in repr(random_layer(16, 32, bias=False))
