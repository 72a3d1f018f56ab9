"""The int8 weight-only kernel (and its pure-torch fallback) against F.linear on the dequantized weights.

Tolerances (the kernel accumulates in fp32):
* fp32 x: |y - ref| <= 1e-5 * max|ref|, ref = F.linear in fp64 on the dequantized weight.
* bf16 x, M <= SMALL_M_MAX: ref = F.linear in fp64 on the bf16 x; the only rounding that matters is the bf16
  output's (<= 2^-9 relative), so elementwise |y - ref| <= 2^-8 |ref| + 1e-4 * max|ref| (the second term for
  outputs near zero, where fp32 summation error is not small relative to the output itself).
* bf16 x, M > SMALL_M_MAX: the dequantize + oneDNN path uses bf16 weights: |y - ref| <= 1e-2 * max|ref|.
"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from rapidlm.compress.kernels import int8_cpu
from rapidlm.compress.kernels.int8_cpu import (
    SMALL_M_MAX,
    Int8Linear,
    Int8Weight,
    int8_kernel_available,
    pack_int8,
    unpack_int8,
)

needs_kernel = pytest.mark.skipif(
    not int8_kernel_available(), reason="int8 CPU kernel unavailable (no compiler, or RAPIDLM_INT8_KERNEL=0)"
)


def random_int8(n: int, k: int, group: int, seed: int = 0) -> Int8Weight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    q[0, : min(k, 5)] = -128  # Q8_0 codes may use -128: make sure it is there
    q[-1, -1] = 127
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    return Int8Weight(q, scale, group)


def reference(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.dequantize().double(), None if bias is None else bias.double())


def assert_close_to_reference(got: torch.Tensor, x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> None:
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], w.shape[0])
    ref = reference(x, w, bias)
    err = (got.double() - ref).abs()
    scale = ref.abs().max()
    m = x.numel() // x.shape[-1]
    if x.dtype == torch.float32:
        assert err.max() <= 1e-5 * scale, f"max error {err.max() / scale:.2e} of the output scale"
    elif m <= SMALL_M_MAX:
        bound = 2.0**-8 * ref.abs() + 1e-4 * scale
        assert (err <= bound).all(), f"max error {(err / bound).max():.2f} x the bound"
    else:
        assert err.max() <= 1e-2 * scale, f"max error {err.max() / scale:.2e} of the output scale"


SHAPES = [(7, 96, 32), (13, 40, 40), (96, 576, 32), (40, 576, 576), (20, 42, 7)]  # (N, K, group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8, 37, SMALL_M_MAX + 44])
@pytest.mark.parametrize("n,k,group", SHAPES)
def test_int8_linear_matches_dequantized_matmul(n, k, group, m, dtype):
    w = random_int8(n, k, group, seed=n * k + m)
    bias = torch.randn(n) if m % 2 else None
    layer = Int8Linear(w, bias)
    x = torch.randn(m, k).to(dtype)
    with torch.inference_mode():
        assert_close_to_reference(layer(x), x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_3d_input_with_bias(dtype):
    w = random_int8(33, 64, 32, seed=3)
    bias = torch.randn(33)
    layer = Int8Linear(w, bias)
    x = torch.randn(2, 5, 64).to(dtype)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (2, 5, 33)
    assert_close_to_reference(y, x, w, bias)
    # A single row (1-D x) gives that row of the batch.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(layer(x[1, 2]).float(), y[1, 2].float(), rtol=tol, atol=tol * y.float().abs().max())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 576])
def test_small_m_kernel_at_any_batch(group, dtype):
    """The kernel (what M <= SMALL_M_MAX runs) past SMALL_M_MAX too: tiles of 8 rows plus a remainder."""
    w = random_int8(50, 576, group, seed=7)
    packed, packed_scale = pack_int8(w)
    x = torch.randn(SMALL_M_MAX + 5, 576).to(dtype)
    y = torch.ops.rapidlm_int8.gemm_small(x, packed, packed_scale, 50, group)
    ref = reference(x, w, None)
    err = (y.double() - ref).abs()
    tol = 1e-5 * ref.abs().max() if dtype == torch.float32 else 2.0**-8 * ref.abs() + 1e-4 * ref.abs().max()
    assert (err <= tol).all()


@needs_kernel
def test_results_do_not_depend_on_the_thread_count():
    w = random_int8(200, 576, 32, seed=5)
    layer = Int8Linear(w)
    x = torch.randn(3, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(max(2, threads))
        many = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # each output is summed by one thread in a fixed order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 37, SMALL_M_MAX + 1])
def test_fallback_gives_the_kernel_results(monkeypatch, m, dtype):
    w, bias = random_int8(21, 96, 32, seed=11), torch.randn(21)
    wc = random_int8(21, 96, 96, seed=12)
    x = torch.randn(m, 96).to(dtype)
    layer, layer_c = Int8Linear(w, bias), Int8Linear(wc)
    kernel, kernel_c = layer(x), layer_c(x)
    monkeypatch.setattr(int8_cpu, "FORCE_FALLBACK", True)
    fb_layer = Int8Linear(w, bias)  # built without the kernel: plain layout
    assert not fb_layer.is_packed
    for lay, wt, b, ref in [(layer, w, bias, kernel), (fb_layer, w, bias, kernel), (layer_c, wc, None, kernel_c)]:
        got = lay(x)
        assert_close_to_reference(got, x, wt, b)
        atol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), ref.float(), rtol=atol, atol=atol * ref.float().abs().max().item())
    assert not int8_kernel_available()


@needs_kernel
def test_inside_torch_compile():
    w, bias = random_int8(24, 64, 32, seed=13), torch.randn(24)
    layer = Int8Linear(w, bias)

    def f(x):
        return torch.relu(layer(x)) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m, dtype in [(1, torch.float32), (3, torch.bfloat16)]:
        x = torch.randn(m, 64).to(dtype)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("n,k,group", [(7, 96, 32), (33, 40, 40), (16, 64, 64)])
def test_pack_roundtrip(n, k, group):
    w = random_int8(n, k, group, seed=17)
    packed, packed_scale = pack_int8(w)
    assert packed.shape == (-(-n // 16), k // 2, 16, 2) and packed_scale.shape == (-(-n // 16), k // group, 16)
    back = unpack_int8(packed, packed_scale, n, group)
    assert torch.equal(back.q, w.q) and torch.equal(back.scale, w.scale)


def test_module_gives_back_its_weight():
    for group in (32, 7):
        w = random_int8(19, 42 if group == 7 else 64, group, seed=19)
        back = Int8Linear(w).int8_weight()
        assert torch.equal(back.q, w.q) and torch.equal(back.scale, w.scale) and back.group_size == group


def test_dequantize_applies_scales_per_group():
    q = torch.tensor([[1, 2, -128, 127]], dtype=torch.int8)
    w = Int8Weight(q, torch.tensor([[0.5, 2.0]]), 2)
    torch.testing.assert_close(w.dequantize(), torch.tensor([[0.5, 1.0, -256.0, 254.0]]))
    assert w.shape == (1, 4)


def test_cat_and_map_rows_act_on_codes_and_scales_together():
    a, b = random_int8(8, 64, 32, seed=1), random_int8(4, 64, 32, seed=2)
    both = Int8Weight.cat([a, b])
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    flipped = both.map_rows(lambda t: t.flip(0))
    torch.testing.assert_close(flipped.dequantize(), both.dequantize().flip(0))
    with pytest.raises(ValueError, match="group sizes"):
        Int8Weight.cat([a, random_int8(4, 64, 64)])
    with pytest.raises(ValueError, match="different K"):
        Int8Weight.cat([a, random_int8(4, 32, 32)])


@pytest.mark.parametrize(
    "q,scale,group,field",
    [
        (torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2), 32, "Int8Weight.q"),
        (torch.zeros(64, dtype=torch.int8), torch.ones(4, 2), 32, "Int8Weight.q"),
        (torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), 48, "Int8Weight.group_size"),
        (torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), 0, "Int8Weight.group_size"),
        (torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), 32.0, "Int8Weight.group_size"),
        (torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), 32, "Int8Weight.scale"),
        (torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2, dtype=torch.float16), 32, "Int8Weight.scale"),
    ],
)
def test_bad_weights_are_rejected_naming_the_field(q, scale, group, field):
    with pytest.raises(ValueError, match=field):
        Int8Weight(q, scale, group)


def test_bad_bias_is_rejected():
    with pytest.raises(ValueError, match="bias"):
        Int8Linear(random_int8(4, 32, 32), torch.zeros(5))


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64") or not shutil.which("g++"),
    reason="the kernel is only required to build on x86-64 Linux with g++",
)
def test_kernel_builds_where_a_compiler_is_present():
    if int8_cpu.FORCE_FALLBACK:
        pytest.skip("RAPIDLM_INT8_KERNEL=0")
    assert int8_cpu.load_kernel()
    assert torch.ops.rapidlm_int8.simd() != "scalar"


@pytest.mark.parametrize("group_size", [32, 96])
def test_rows_do_not_depend_on_the_batch_they_share(group_size):
    """bf16 decode of a sequence alone or in a batch must give bit-identical outputs (batch == single)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-128, 128, (80, 96), dtype=torch.int8, generator=g)
    layer = Int8Linear(Int8Weight(q, torch.rand(80, 96 // group_size, generator=g) * 0.01, group_size))
    x = torch.randn(11, 96, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        together = layer(x)
        alone = torch.cat([layer(x[i : i + 1]) for i in range(11)])
    assert torch.equal(together, alone)
