"""int8 and int4 weight-only linears on CUDA: rapidlm's own Triton GEMV kernels, PyTorch's int4 kernel as an option.

Decoding is bound by the bytes of weight read per token: int8 halves and int4 (4.25 bits with fp16 scale and
offset per group of 128) quarters them against bf16. quantize() (rapidlm.compress.quantize) swaps a model's
linears for these modules when the model lives on a CUDA device.

Kernels (one Triton program per BLOCK_N output rows; grid (N / BLOCK_N, M)):
- int8: codes (N, K) int8 and one fp32 scale per output row; y = scale_n * sum_k q_nk x_k in fp32.
- int4: codes packed two per byte (N, K/2) uint8, low nibble = even k; per group of G inputs an fp16 scale and
  offset (w = scale * q + offset, q in 0..15, rapidlm's Int4Weight convention); per group
  y += scale * (q . x) + offset * sum(x). Nibbles become floats by the exponent trick (q | 0x4B000000 read as fp32
  is 2^23 + q), which costs two integer ops instead of a slow int-to-float conversion.
Both accumulate in fp32 and round once to the activation dtype. They serve M <= GEMV_MAX_M rows (decode); larger
M (prefill) dequantizes to the activation dtype and calls cuBLAS.

Block shapes are chosen per (N, K, M) on first use by timing each candidate's launches in a CUDA graph over
rotating weight copies larger than L2 (`tuned_configs()` shows the picks; RAPIDLM_CUDA_TUNE=0 keeps the defaults),
never during CUDA-graph capture. `linear_decode` does the same for plain float weights, with cuBLAS as one more
candidate (the fused CUDA-graph decode path calls it for nn.Linear modules).

int4 backend "tinygemm" (RAPIDLM_CUDA_INT4=tinygemm) instead stores PyTorch's `_convert_weight_to_int4pack`
layout with bf16 scale/zero pairs and runs `torch._weight_int4pack_mm` (zero = offset + 8 * scale).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from rapidlm.compress.kernels.int4_cpu import Int4Weight
from rapidlm.compress.kernels.int8_cpu import Int8Weight

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

GEMV_MAX_M = 8  # rows served by the GEMV kernels; more rows dequantize + cuBLAS
INT4_BACKEND = os.environ.get("RAPIDLM_CUDA_INT4", "triton")  # "triton" or "tinygemm"
TUNE = os.environ.get("RAPIDLM_CUDA_TUNE", "1") != "0"

# (BLOCK_N, BLOCK_K, num_warps) for int8 / bf16 rows; (BLOCK_N, groups per step, num_warps) for int4
# (K is a compile-time constant of both kernels: one compile per config and matrix width.)
DENSE_CONFIGS = [(8, 1024, 4), (4, 1024, 4), (16, 512, 4), (2, 2048, 4), (4, 2048, 8)]
INT4_CONFIGS = [(8, 4, 4), (16, 4, 4), (4, 8, 4), (32, 2, 4), (16, 8, 8), (8, 8, 4)]
_tuned: dict[tuple, object] = {}
_timings: dict[tuple, float] = {}  # the chosen candidate's time per launch, ms
# float weights at decode (M <= GEMV_MAX_M) in the fused CUDA-graph path: "auto" times cuBLAS against the Triton
# GEMV per shape and keeps the faster; "cublas" or "triton" forces one.
DENSE_BACKEND = os.environ.get("RAPIDLM_CUDA_DENSE", "auto")


def cuda_kernels_available() -> bool:
    return HAS_TRITON and torch.cuda.is_available()


def tuned_configs() -> dict[tuple, object]:
    """(kernel, N, K, ...) -> (the candidate picked for it, its time in ms), filled on first use of each shape."""
    return {k: (v, _timings.get(k)) for k, v in _tuned.items()}


if HAS_TRITON:

    @triton.jit
    def _dense_gemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        b_ptr,
        y_ptr,
        N,
        K: tl.constexpr,
        s_xm,
        s_wn,
        s_ym,
        INT8: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        rows = w_ptr + n.to(tl.int64)[:, None] * s_wn
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_ptr + m * s_xm + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            if INT8:  # int8 -> fp32 by the exponent trick: (q + 128) | 0x4B000000 is 2^23 + 128 + q
                wf = ((w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True)) - 8388736.0
            else:
                wf = w.to(tl.float32)
            acc += wf * x[None, :]
        y = tl.sum(acc, axis=1)
        if INT8:
            y = y * tl.load(s_ptr + n, mask=n_ok, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * s_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _int4_gemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        o_ptr,
        b_ptr,
        y_ptr,
        N,
        K: tl.constexpr,
        s_xm,
        s_wn,
        s_sn,
        s_ym,
        G: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        U: tl.constexpr,
    ):
        pid = tl.program_id(0)
        m = tl.program_id(1).to(tl.int64)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        n64 = n.to(tl.int64)
        j = tl.arange(0, G // 2)
        acc = tl.zeros((BLOCK_N, G // 2), dtype=tl.float32)  # scale * (q . x) terms, reduced once at the end
        acc_off = tl.zeros((BLOCK_N, G // 2), dtype=tl.float32)  # offset * x terms, likewise
        for k0 in range(0, K, G * U):
            for u in tl.static_range(U):
                kg = k0 + u * G  # first input of this group
                g_ok = kg < K
                cols = kg // 2 + j
                wb = tl.load(w_ptr + n64[:, None] * s_wn + cols[None, :], mask=n_ok[:, None] & g_ok, other=0)
                wi = wb.to(tl.int32)
                lo = ((wi & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                hi = ((wi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                xe = tl.load(x_ptr + m * s_xm + kg + 2 * j, mask=g_ok & (j >= 0), other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + m * s_xm + kg + 2 * j + 1, mask=g_ok & (j >= 0), other=0.0).to(tl.float32)
                gi = kg // G
                sc = tl.load(s_ptr + n64 * s_sn + gi, mask=n_ok & g_ok, other=0.0).to(tl.float32)
                of = tl.load(o_ptr + n64 * s_sn + gi, mask=n_ok & g_ok, other=0.0).to(tl.float32)
                acc += (lo * xe[None, :] + hi * xo[None, :]) * sc[:, None]
                acc_off += of[:, None] * (xe + xo)[None, :]
        y = tl.sum(acc + acc_off, axis=1)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * s_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


ROTATE_BYTES = 160 * 1024**2  # tuning rotates over weight copies at least this large together (beyond L2)


def _time_graph_ms(launch, cfg, sets: list[tuple], reps: int = 16) -> float:  # noqa: ANN001
    """GPU time of one launch(cfg, *operands): `reps` launches over rotating operand sets captured in a CUDA graph,
    so neither Python launch cost nor an L2-resident weight shows in the figure."""
    launch(cfg, *sets[0])  # compile / first-use work outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            launch(cfg, *sets[i % len(sets)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (3 * reps)


def _choose(key: tuple, candidates: list, launch, operands: tuple, default=None):  # noqa: ANN001, ANN201
    """The fastest candidate for `key` (timed once per process, never during graph capture); `default` (or the
    first candidate) when not tuning, when interpreting, or while a CUDA graph is being captured. launch(cand,
    *operands) runs one; tuning clones the weight operands (tensors of 2 dims) so that they exceed L2 together."""
    if key in _tuned:
        return _tuned[key]
    default = candidates[0] if default is None else default
    if not TUNE or _interpreting() or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return default
    nbytes = sum(t.nbytes for t in operands if isinstance(t, torch.Tensor) and t.dim() == 2)
    copies = max(1, min(32, -(-ROTATE_BYTES // max(1, nbytes))))
    sets = [operands] + [
        tuple(t.clone() if isinstance(t, torch.Tensor) and t.dim() == 2 else t for t in operands)
        for _ in range(copies - 1)
    ]
    best, best_ms = default, float("inf")
    for cand in candidates:
        try:
            ms = _time_graph_ms(launch, cand, sets)
        except Exception:  # noqa: BLE001 - a candidate that fails to compile, launch or capture is skipped
            torch.cuda.synchronize()
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    _tuned[key] = best
    _timings[key] = best_ms
    return best


def dense_gemv(
    x: torch.Tensor,  # (M, K)
    w: torch.Tensor,  # (N, K) int8 (with scale) or a float dtype (no scale)
    scale: torch.Tensor | None = None,  # (N,) fp32 per-row scale for int8
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # (M, N) in x's dtype
    M, K = x.shape
    N = w.shape[0]
    int8 = w.dtype == torch.int8
    if int8 and scale is None:
        raise ValueError("an int8 weight needs its per-row scale")
    if out is None:
        out = x.new_empty((M, N))
    if w.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("dense_gemv needs rows with a contiguous last dim")

    def launch(cfg: tuple[int, int, int], w: torch.Tensor) -> None:
        bn, bk, warps = cfg
        _dense_gemv_kernel[(triton.cdiv(N, bn), M)](
            x, w, scale if int8 else w, bias if bias is not None else w, out, N, K,
            x.stride(0), w.stride(0), out.stride(0),
            INT8=int8, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        )  # fmt: skip

    launch(_choose(("int8" if int8 else "dense", N, K, M, x.dtype), DENSE_CONFIGS, launch, (w,)), w)
    return out


def linear_decode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight^T (+ bias) for a float weight at decode sizes: cuBLAS or rapidlm's Triton GEMV, whichever
    was timed faster for this (N, K, M, dtype) (see DENSE_BACKEND)."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    triton_ok = HAS_TRITON and M <= GEMV_MAX_M and weight.stride(1) == 1 and weight.dtype == x.dtype
    if DENSE_BACKEND == "cublas" or not triton_ok:
        return F.linear(x, weight, bias)
    out = x.new_empty((M, N))

    def launch(cand, w: torch.Tensor):  # noqa: ANN001, ANN202
        if cand == "cublas":
            return torch.matmul(x, w.t(), out=out) if bias is None else torch.addmm(bias, x, w.t(), out=out)
        bn, bk, warps = cand
        _dense_gemv_kernel[(triton.cdiv(N, bn), M)](
            x, w, w, bias if bias is not None else w, out, N, K, x.stride(0), w.stride(0), out.stride(0),
            INT8=False, HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        )  # fmt: skip

    candidates = DENSE_CONFIGS if DENSE_BACKEND == "triton" else ["cublas", *DENSE_CONFIGS]
    choice = _choose(("linear", N, K, M, x.dtype), candidates, launch, (weight,))
    if choice == "cublas":
        return F.linear(x, weight, bias)
    launch(choice, weight)
    return out


def int4_gemv(
    x: torch.Tensor,  # (M, K)
    packed: torch.Tensor,  # (N, K/2) uint8
    scale: torch.Tensor,  # (N, K/G)
    offset: torch.Tensor,  # (N, K/G)
    group_size: int,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    M, K = x.shape
    N = packed.shape[0]
    if out is None:
        out = x.new_empty((M, N))
    if x.stride(1) != 1 or packed.stride(1) != 1 or scale.stride() != offset.stride():
        raise ValueError("int4_gemv needs contiguous rows and scale/offset of the same layout")

    def launch(cfg: tuple[int, int, int], packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        bn, u, warps = cfg
        _int4_gemv_kernel[(triton.cdiv(N, bn), M)](
            x, packed, scale, offset, bias if bias is not None else scale, out, N, K,
            x.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
            G=group_size, HAS_BIAS=bias is not None, BLOCK_N=bn, U=u, num_warps=warps,
        )  # fmt: skip

    ops = (packed, scale, offset)
    launch(_choose(("int4", N, K, group_size, M, x.dtype), INT4_CONFIGS, launch, ops), *ops)
    return out


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in 0..15 -> (N, K/2) uint8, low nibble = even k, high nibble = odd k."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty((n, half * 2), dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out


def _fp16_if_exact_enough(t: torch.Tensor) -> torch.Tensor:
    """fp16 holds weight scales/offsets to ~3 decimal digits; keep fp32 where fp16 would overflow."""
    return t.to(torch.float16) if bool(torch.isfinite(t.to(torch.float16)).all()) else t.float()


class CudaInt8Linear(nn.Module):
    """y = x @ W^T (+ b), W as int8 codes with one fp32 scale per output row (a per-group Int8Weight, e.g. GGUF
    Q8_0, is held too but runs dequantize + matmul)."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.register_buffer("q", weight.q.contiguous(), persistent=False)
        scale = weight.scale.float()
        self.register_buffer("scale", (scale[:, 0] if scale.shape[1] == 1 else scale).contiguous(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """fp32 (N, K): the weights this module multiplies by."""
        n, k = self.q.shape
        scale = self.scale if self.scale.dim() == 2 else self.scale[:, None]
        return (self.q.float().view(n, scale.shape[1], -1) * scale[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= GEMV_MAX_M and self.scale.dim() == 1 and x.is_cuda and HAS_TRITON:
            y = dense_gemv(x2.contiguous(), self.q, self.scale, self.bias)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class CudaInt4Linear(nn.Module):
    """y = x @ W^T (+ b), W as 4-bit codes with a scale and offset per group of `group_size` inputs."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        self.backend = backend or INT4_BACKEND
        if self.backend not in ("triton", "tinygemm"):
            raise ValueError(f"CudaInt4Linear backend must be 'triton' or 'tinygemm', got {self.backend!r}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        q = weight.q.to(torch.uint8)
        if self.backend == "tinygemm":
            # PyTorch's layout: (q[:, even] << 4 | q[:, odd]) packed by _convert_weight_to_int4pack; its kernel
            # computes (q - 8) * scale + zero, so zero = offset + 8 * scale; both bf16, shaped (K/G, N, 2).
            self.register_buffer(
                "packed", torch._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), 8), False
            )
            zero = weight.offset.float() + 8 * weight.scale.float()
            sz = torch.stack([weight.scale.float(), zero], dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_zeros", sz.to(torch.bfloat16), persistent=False)
            return
        self.register_buffer("packed", pack_nibbles(q), persistent=False)
        both = _fp16_if_exact_enough(torch.stack([weight.scale.float(), weight.offset.float()]))
        self.register_buffer("scale", both[0].contiguous(), persistent=False)
        self.register_buffer("offset", both[1].contiguous(), persistent=False)

    def dequantize(self) -> torch.Tensor:
        """fp32 (N, K): the weights this module multiplies by (scales as stored)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.backend == "tinygemm":
            eye = torch.eye(k, dtype=torch.bfloat16, device=self.packed.device)
            return torch._weight_int4pack_mm(eye, self.packed, g, self.scales_zeros).float().t().contiguous()
        q = unpack_nibbles(self.packed).float().view(n, k // g, g)
        return (q * self.scale.float()[..., None] + self.offset.float()[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bias = self.bias
        if self.backend == "tinygemm":
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.group_size,
                                          self.scales_zeros)  # fmt: skip
            y = y.to(x.dtype) if bias is None else (y.float() + bias).to(x.dtype)
        elif x2.shape[0] <= GEMV_MAX_M and x.is_cuda and HAS_TRITON:
            y = int4_gemv(x2.contiguous(), self.packed, self.scale, self.offset, self.group_size, bias)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{self.group_size} " + (
            self.backend
        )


def int8_module(weight: Int8Weight, bias: torch.Tensor | None) -> CudaInt8Linear:
    return CudaInt8Linear(weight, bias)


def int4_module(weight: Int4Weight, bias: torch.Tensor | None) -> CudaInt4Linear:
    return CudaInt4Linear(weight, bias)
