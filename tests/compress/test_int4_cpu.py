"""The int4 kernel path (and its fallbacks) against F.linear on the dequantized weights.

Tolerances (the kernel accumulates in fp32 with fp32 scales and offsets):
* fp32 x (act_dtype=float32): |y - ref| <= 1e-5 * max|ref|, ref = F.linear in fp64 on the dequantized weight.
* bf16 x, M <= SMALL_M_MAX: ref = F.linear in fp64 on the bf16 x; the rounding that matters is the bf16 output's
  (<= 2^-9 relative), so elementwise |y - ref| <= 2^-8 |ref| + 1e-4 * max|ref| (the second term for outputs near
  zero, where fp32 summation error is not small relative to the output itself).
* bf16 x, M > SMALL_M_MAX (prefill): dequantize to bf16 + oneDNN: |y - ref| <= 1e-2 * max|ref|.
"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from rapidlm.compress.kernels import int4_cpu
from rapidlm.compress.kernels.int4_cpu import (
    SMALL_M_MAX,
    Int4Linear,
    Int4Weight,
    int4_kernel_available,
    pack_int4,
    unpack_int4,
)

needs_kernel = pytest.mark.skipif(
    int4_cpu.FORCE_FALLBACK or not int4_cpu.load_kernel(),
    reason="rapidlm's int4 CPU kernel unavailable (no compiler, or RAPIDLM_INT4_KERNEL=0)",
)
needs_torch_int4 = pytest.mark.skipif(
    not int4_cpu._torch_int4_available(), reason="no _weight_int4pack_mm_for_cpu in this PyTorch"
)


def random_int4(n: int, k: int, group: int = 32, seed: int = 0, fp16: bool = False) -> Int4Weight:
    """fp16: scales and offsets that fp16 holds exactly, as GGUF's Q4_0/Q4_1 (the kernel then stores fp16)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    q[0, : min(k, 3)] = 15  # both ends of the code range are there
    q[-1, -1] = 0
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offset = -torch.rand(n, k // group, generator=g) * 0.1
    if fp16:
        scale, offset = scale.half().float(), offset.half().float()
    return Int4Weight(q, scale, offset, group)


def reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.dequantize().double(), None if bias is None else bias.double())


def assert_close_to_reference(
    got: torch.Tensor, x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, layout: str = "rapidlm"
) -> None:
    """layout: the module's; PyTorch's int4 kernel (the fallback) rounds scales to bf16 for bf16 x."""
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], w.shape[0])
    ref = reference(x, w, bias)
    err = (got.double() - ref).abs()
    scale = ref.abs().max()
    m = x.numel() // x.shape[-1]
    if x.dtype == torch.float32:
        assert err.max() <= 1e-5 * scale, f"max error {err.max() / scale:.2e} of the output scale"
    elif layout == "torch":
        assert err.max() <= 2e-2 * scale, f"max error {err.max() / scale:.2e} of the output scale"
    elif m <= SMALL_M_MAX:
        bound = 2.0**-8 * ref.abs() + 1e-4 * scale
        assert (err <= bound).all(), f"max error {(err / bound).max():.2f} x the bound"
    else:
        assert err.max() <= 1e-2 * scale, f"max error {err.max() / scale:.2e} of the output scale"


SHAPES = [(7, 64, 32), (13, 96, 32), (40, 128, 64), (40, 256, 128), (96, 576, 32), (21, 512, 256)]  # (N, K, group)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 37, 300])
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_int4_linear_matches_dequantized_matmul(n, k, group, m, dtype):
    w = random_int4(n, k, group, seed=n * k + m)
    bias = torch.randn(n) if m % 2 else None
    layer = Int4Linear(w, bias, act_dtype=dtype)
    x = torch.randn(m, k).to(dtype)
    with torch.inference_mode():
        assert_close_to_reference(layer(x), x, w, bias, layer.layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 37, 300])
@pytest.mark.parametrize("n,k,group", [(13, 96, 32), (40, 256, 128), (96, 576, 32)])
def test_fp16_exact_scales_are_stored_as_fp16(n, k, group, m, dtype):
    """GGUF-like scales (exact in fp16) are held as fp16 by the kernel's layout, with the same results."""
    w = random_int4(n, k, group, seed=n + m, fp16=True)
    q4_0 = Int4Weight(w.q, w.scale, -8 * w.scale, group)  # llama.cpp's Q4_0: offset = -8 scale
    for weight in (w, q4_0):
        bias = torch.randn(n) if m % 2 else None
        layer = Int4Linear(weight, bias, act_dtype=dtype)
        if layer.layout == "rapidlm":
            assert layer.scales_zeros.dtype == torch.float16
        x = torch.randn(m, k).to(dtype)
        with torch.inference_mode():
            assert_close_to_reference(layer(x), x, weight, bias, layer.layout)


@pytest.mark.parametrize("m", [1, 7, 64])
def test_bf16_module_on_bf16_input(m):
    w = random_int4(96, 128)
    bias = torch.randn(96)
    layer = Int4Linear(w, bias)
    x = torch.randn(1, m, 128).to(torch.bfloat16)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (1, m, 96)
    assert_close_to_reference(got, x, w, bias, layer.layout)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k,group", [(40, 64, 32), (7, 128, 64), (96, 256, 128)])
def test_input_dtype_other_than_act_dtype(m, n, k, group):
    """x of another dtype is computed in act_dtype and cast back: fp32 x on a bf16 module, bf16 x on fp32."""
    w = random_int4(n, k, group, seed=n)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    expected = reference(x, w, bias)
    with torch.inference_mode():
        exact = Int4Linear(w, bias, act_dtype=torch.float32)(x)
        fast = Int4Linear(w, bias)(x)  # bf16 compute, cast back to fp32
        from_bf16 = Int4Linear(w, bias, act_dtype=torch.float32)(x.bfloat16())
    assert exact.shape == (m, n) and exact.dtype == torch.float32 and fast.dtype == torch.float32
    torch.testing.assert_close(exact.double(), expected, rtol=1e-5, atol=1e-4)
    assert (fast.double() - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert from_bf16.dtype == torch.bfloat16
    assert_close_to_reference(from_bf16, x.bfloat16(), w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_3d_input_with_bias(dtype):
    w = random_int4(33, 64, 32, seed=3)
    bias = torch.randn(33)
    layer = Int4Linear(w, bias, act_dtype=dtype)
    x = torch.randn(2, 5, 64).to(dtype)
    with torch.inference_mode():
        y = layer(x)
        row = layer(x[1, 2])  # 1-D x: that row of the batch
    assert y.shape == (2, 5, 33)
    assert_close_to_reference(y, x, w, bias, layer.layout)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(row.float(), y[1, 2].float(), rtol=tol, atol=tol * y.float().abs().max())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 256])
def test_small_m_kernel_at_any_batch(group, dtype):
    """The kernel past SMALL_M_MAX too (tiles of 8 rows plus a remainder), and the large-M path at small M."""
    w = random_int4(50, 512, group, seed=7)
    bias = torch.randn(50)
    packed, scales_zeros = pack_int4(w)
    x = torch.randn(SMALL_M_MAX + 13, 512).to(dtype)
    y = torch.ops.rapidlm_int4.gemm_small(x, packed, scales_zeros, 50, group, bias)
    ref = reference(x, w, bias)
    err = (y.double() - ref).abs()
    tol = 1e-5 * ref.abs().max() if dtype == torch.float32 else 2.0**-8 * ref.abs() + 1e-4 * ref.abs().max()
    assert (err <= tol).all()
    d = torch.ops.rapidlm_int4.dequantize_matmul(x[:3], packed, scales_zeros, 50, group)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (d.double() - reference(x[:3], w, None)).abs().max() <= tol * ref.abs().max()


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    w = random_int4(200, 576, 32, seed=5)
    layer = Int4Linear(w)
    x = torch.randn(3, 576).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(max(2, threads))
        many = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # each output is summed by one thread in a fixed order


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 37, SMALL_M_MAX + 1])
def test_fallback_gives_the_kernel_results(monkeypatch, m, dtype):
    w, bias = random_int4(21, 96, 32, seed=11), torch.randn(21)
    x = torch.randn(m, 96).to(dtype)
    layer = Int4Linear(w, bias, act_dtype=dtype)
    assert layer.layout == "rapidlm"
    with torch.inference_mode():
        kernel = layer(x)
    monkeypatch.setattr(int4_cpu, "FORCE_FALLBACK", True)
    monkeypatch.setattr(int4_cpu, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="RAPIDLM_INT4_KERNEL=0"):
        fb_layer = Int4Linear(w, bias, act_dtype=dtype)  # built without the kernel: PyTorch's or plain layout
    assert fb_layer.layout in ("torch", "plain")
    monkeypatch.setattr(int4_cpu, "_torch_int4_available", lambda: False)
    plain = Int4Linear(w, bias, act_dtype=dtype)
    assert plain.layout == "plain"
    # bf16: PyTorch's kernel rounds scales to bf16 (about 2^-9 relative), hence the wider tolerance
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for lay in (fb_layer, plain, layer):  # layer: the kernel's layout with the kernel switched off
            got = lay(x)
            if dtype == torch.float32 or lay is not fb_layer:
                assert_close_to_reference(got, x, w, bias)
            torch.testing.assert_close(
                got.float(), kernel.float(), rtol=rtol, atol=rtol * kernel.float().abs().max().item()
            )
    assert int4_kernel_available() == int4_cpu._torch_int4_available()


@needs_kernel
def test_inside_torch_compile():
    w, bias = random_int4(24, 64, 32, seed=13), torch.randn(24)
    layer = Int4Linear(w, bias)
    layer32 = Int4Linear(w, bias, act_dtype=torch.float32)

    def f(x):
        return layer(x), torch.relu(layer32(x.float())) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 3):
        x = torch.randn(m, 64).to(torch.bfloat16)
        with torch.inference_mode():
            for got, want in zip(compiled(x), f(x), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("n,k,group", [(7, 64, 32), (33, 96, 32), (16, 256, 128), (5, 256, 256)])
@pytest.mark.parametrize("fp16", [False, True])
def test_pack_roundtrip(n, k, group, fp16):
    w = random_int4(n, k, group, seed=17, fp16=fp16)
    packed, scales_zeros = pack_int4(w)
    assert packed.shape == (-(-n // 16), k // 8, 64) and packed.dtype == torch.uint8
    assert scales_zeros.shape == (-(-n // 16), k // group, 2, 16)
    assert scales_zeros.dtype == (torch.float16 if fp16 else torch.float32)
    back = unpack_int4(packed, scales_zeros, n, group)
    assert torch.equal(back.q, w.q) and torch.equal(back.scale, w.scale) and torch.equal(back.offset, w.offset)
    assert pack_int4(w, compact=False)[1].dtype == torch.float32


def test_pack_layout_puts_pair_i_in_nibble_i():
    """Word w = 2r + e of chunk c holds in nibble i the code of row r, input 8c + 2i + e (see int4_gemv.cpp)."""
    n, k = 16, 64
    q = torch.arange(n * k).reshape(n, k).remainder(16).to(torch.uint8).flip(1).contiguous()
    packed, _ = pack_int4(Int4Weight(q, torch.ones(n, 2), torch.zeros(n, 2), 32))
    words = packed[0].to(torch.int32).view(k // 8, 32, 2)
    words = words[..., 0] | (words[..., 1] << 8)  # little-endian 16-bit words
    for c in range(k // 8):
        for w in range(32):
            r, e = divmod(w, 2)
            for i in range(4):
                assert (words[c, w] >> (4 * i)) & 15 == q[r, 8 * c + 2 * i + e]


@needs_kernel
@pytest.mark.parametrize("fp16", [False, True])
def test_kernel_dequantize_matches_int4_weight(fp16):
    w = random_int4(37, 256, 64, seed=23, fp16=fp16)
    packed, scales_zeros = pack_int4(w)
    got = torch.ops.rapidlm_int4.dequantize(packed, scales_zeros, 37, 64, torch.float32)
    torch.testing.assert_close(got, w.dequantize(), rtol=1e-6, atol=1e-7)
    got16 = torch.ops.rapidlm_int4.dequantize(packed, scales_zeros, 37, 64, torch.bfloat16)
    torch.testing.assert_close(got16, w.dequantize().bfloat16())


def test_module_gives_back_its_weight():
    w = random_int4(19, 64, 32, seed=19)
    layer = Int4Linear(w)
    if layer.layout == "torch":
        pytest.skip("PyTorch's int4pack layout is not unpacked")
    back = layer.int4_weight()
    assert torch.equal(back.q, w.q) and torch.equal(back.scale, w.scale) and torch.equal(back.offset, w.offset)


def test_bad_bias_is_rejected():
    with pytest.raises(ValueError, match="bias"):
        Int4Linear(random_int4(4, 32, 32), torch.zeros(5))


def test_cat_and_map_rows_act_on_codes_and_scales_together():
    a, b = random_int4(8, 64, seed=1), random_int4(4, 64, seed=2)
    both = Int4Weight.cat([a, b])
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    flipped = both.map_rows(lambda t: t.flip(0))
    torch.testing.assert_close(flipped.dequantize(), both.dequantize().flip(0))


def test_bad_group_size_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight(torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 48)


@needs_torch_int4
@pytest.mark.parametrize("m", [1, 3, 8])
def test_torch_int4_fallback_with_odd_rows(monkeypatch, m):
    """PyTorch's kernel wants multiples of 16 rows: the fallback pads and slices."""
    monkeypatch.setattr(int4_cpu, "FORCE_FALLBACK", True)
    monkeypatch.setattr(int4_cpu, "_fallback_warned", True)
    w, bias = random_int4(13, 128, 64, seed=29), torch.randn(13)
    layer = Int4Linear(w, bias, act_dtype=torch.float32)
    assert layer.layout == "torch"
    x = torch.randn(m, 128)
    with torch.inference_mode():
        assert_close_to_reference(layer(x), x, w, bias)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64") or not shutil.which("g++"),
    reason="the kernel is only required to build on x86-64 Linux with g++",
)
def test_kernel_builds_where_a_compiler_is_present():
    if int4_cpu.FORCE_FALLBACK:
        pytest.skip("RAPIDLM_INT4_KERNEL=0")
    assert int4_cpu.load_kernel()
    assert torch.ops.rapidlm_int4.simd() != "scalar"
    assert torch.ops.rapidlm_int4.kernel_max_m_bf16() == SMALL_M_MAX


def test_int4_rows_do_not_depend_on_the_batch_they_share():
    """bf16 decode of a sequence alone or in a batch must give bit-identical outputs (batch == single)."""
    layer = Int4Linear(random_int4(80, 128, 32, seed=3))
    x = torch.randn(11, 128).to(torch.bfloat16)
    with torch.inference_mode():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(11)])
    assert torch.equal(together, alone)
