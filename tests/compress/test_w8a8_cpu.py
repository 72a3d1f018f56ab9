"""W8A8 dynamic linear: rapidlm's VNNI kernel against the exact integer arithmetic; the fbgemm and float paths."""

from __future__ import annotations

import pytest
import torch

from rapidlm.compress.kernels import w8a8_cpu
from rapidlm.compress.kernels.w8a8_cpu import (
    W8A8Linear,
    fbgemm_available,
    pack_w8a8,
    unpack_w8a8,
    w8a8_kernel_available,
)
from rapidlm.compress.primitives import quantize_per_token_int8

needs_kernel = pytest.mark.skipif(not w8a8_kernel_available(), reason="no AVX512-VNNI W8A8 kernel on this CPU")


def random_layer(n: int, k: int, bias: bool, seed: int = 0) -> W8A8Linear:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    return W8A8Linear(q, scale, torch.randn(n, generator=g) if bias else None)


def spread_rows(m: int, k: int, seed: int = 1) -> torch.Tensor:
    """Rows of very different ranges, so that per-token scales matter."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]


def integer_reference(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic, exactly: integer sums (exact in float64), then float(sum) * s_x * s_w (+ b) in fp32."""
    xq, xs = quantize_per_token_int8(x)
    sums = (xq.double() @ layer.q.double().T).float()
    y = sums * xs * layer.scale
    return y if layer.bias is None else y + layer.bias


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 7, 8, 13])
@pytest.mark.parametrize("n,k,bias", [(13, 40, True), (13, 42, False), (96, 64, True), (576, 1536, False)])
def test_kernel_equals_integer_arithmetic(m, n, k, bias):
    layer = random_layer(n, k, bias)
    assert layer.backend == "rapidlm-vnni"
    x = spread_rows(m, k)
    with torch.inference_mode():
        got = layer(x)
        ref = integer_reference(layer, x)
        # fp32: the same operations up to the rounding of int32 -> float of sums beyond 2^24
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        xb = x.to(torch.bfloat16)  # bf16 in and out: the reference rounded once at the end
        torch.testing.assert_close(layer(xb), integer_reference(layer, xb).to(torch.bfloat16), rtol=0, atol=0)


@needs_kernel
def test_kernel_is_batch_invariant_and_matches_3d_shape():
    layer = random_layer(200, 96, bias=True)
    x = spread_rows(32, 96)
    with torch.inference_mode():
        batched = layer(x)
        single = torch.cat([layer(x[i : i + 1]) for i in range(32)])
        assert torch.equal(batched, single)
        assert torch.equal(layer(x.view(4, 8, 96)), batched.view(4, 8, 200))


@needs_kernel
def test_kernel_under_torch_compile():
    layer = random_layer(48, 64, bias=False)
    x = spread_rows(5, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # the op traces through its fake kernel
    with torch.inference_mode():
        assert torch.equal(compiled(x), layer(x))


def test_pack_round_trip_and_row_sums():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (21, 38), dtype=torch.int8, generator=g)
    scale = torch.rand(21, generator=g)
    packed, wsum, sp = pack_w8a8(q, scale)
    assert packed.shape == (2, 10, 16, 4) and wsum.shape == (32,) and sp.shape == (32,)
    assert torch.equal(unpack_w8a8(packed, 21, 38), q)
    assert torch.equal(wsum[:21], q.sum(1, dtype=torch.int32)) and not wsum[21:].any()
    assert torch.equal(sp[:21], scale) and not sp[21:].any()


@pytest.mark.parametrize("path", ["kernel", "fallback"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_every_path_is_close_to_the_float_weights(monkeypatch, path, m):
    if path == "fallback":
        monkeypatch.setattr(w8a8_cpu, "FORCE_FALLBACK", True)
    elif not w8a8_kernel_available():
        pytest.skip("no AVX512-VNNI W8A8 kernel on this CPU")
    layer = random_layer(576, 1536, bias=True)
    x = spread_rows(m, 1536)
    with torch.inference_mode():
        got = layer(x)
        exact = x.double() @ (layer.q.double() * layer.scale.double()[:, None]).T + layer.bias.double()
    # 8-bit activations (fbgemm without VNNI: 7) keep each row within a few % of the exact product.
    err = (got.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert (err < 0.03).all(), err
    if path == "fallback":
        assert layer.backend == ("fbgemm" if fbgemm_available() else "reference")
        ref = layer.reference(x).double()
        assert ((got.double() - ref).norm(dim=-1) / ref.norm(dim=-1) < 0.03).all()


def test_w8a8_validation():
    with pytest.raises(ValueError, match="int8"):
        W8A8Linear(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        W8A8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))


@needs_kernel
def test_kernel_rejects_mismatched_inputs():
    layer = random_layer(16, 32, bias=False)
    with pytest.raises(RuntimeError, match="inputs"):
        layer(torch.randn(2, 40))
    with pytest.raises(RuntimeError, match="out_features"):
        torch.ops.rapidlm_w8a8.gemm(torch.randn(2, 32), layer.packed, layer.wsum, layer.packed_scale, 40, None)
