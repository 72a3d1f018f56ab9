"""4-bit weights with per-group affine scales, run by a small C++ kernel on the CPU.

A weight row is split into groups of `group_size` inputs; each group stores 4-bit codes q in [0, 15] and
w = scale * q + offset. This is exactly llama.cpp's Q4_0 (offset = -8 * scale) and Q4_1 (offset = min)
blocks, so a GGUF file's 4-bit tensors run as stored instead of being inflated to 16 bits: a decode step reads
under a third of the bytes of bf16 (codes + scale and offset, held as fp16 where that is exact, as for GGUF).

The kernel (`int4_gemv.cpp`, built on first use with `torch.utils.cpp_extension.load` and cached) streams the
codes in a layout packed once at load (`pack_int4`: 16 output rows x 8 inputs per 64 bytes), unpacks them in
registers with a shift and one logic op per 32 codes and multiplies them into every row of x, accumulating in
fp32 with the identity y = sum_g scale_g * (q_g . x_g) + offset_g * sum(x_g). bf16 x: exact bf16 products
(AVX512-BF16 vdpbf16ps); fp32 x: fp32 FMAs, so act_dtype=float32 equals F.linear on the dequantized weight up to
summation order (scales and offsets are kept exactly: fp32, or fp16 only when every value converts exactly).
Decode (M = 1) streams the weight at ~30 GB/s here, 1.3-1.5x PyTorch's int4 kernel on the larger matrices; small
batches (M = 2..16) read it once for all rows (~2x). bf16 batches above SMALL_M_MAX rows (prefill) dequantize a
few MiB of rows at a time to bf16 and call `at::linear` (oneDNN), faster there. It is the C++ op
`rapidlm_int4::gemm`, so `torch.compile` calls it as an opaque op with no Python between.

Without a working compiler (or with RAPIDLM_INT4_KERNEL=0 in the environment) the module runs PyTorch's own
int4 kernel `_weight_int4pack_mm_for_cpu` as before (bf16 activations round the scales to bf16), or, without
that either, dequantize + matmul; one RuntimeWarning says so.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rapidlm.compress.kernels.build import try_build

GROUP_SIZES = (32, 64, 128, 256)  # group sizes an Int4Weight may have (all run by both kernels)

_SOURCE = Path(__file__).with_name("int4_gemv.cpp")
# bf16 batches above this many rows dequantize + matmul (kKernelMaxMBf16 in the C++ source)
SMALL_M_MAX = 128
BLOCK_ROWS = 16  # output rows per packed block (RB in the C++ source)
CHUNK_K = 8  # inputs per 64-byte chunk of a block

# Hold scales and offsets as fp16 where that is exact (GGUF's Q4_0/Q4_1): fewer bytes per decode step.
COMPACT_SCALES = True
# Set to True (or RAPIDLM_INT4_KERNEL=0 in the environment) to run the fallback even where the kernel builds.
FORCE_FALLBACK = os.environ.get("RAPIDLM_INT4_KERNEL", "1") == "0"

_kernel_ready = False  # the C++ op is loaded (read on every forward; a plain global so torch.compile can guard on it)
_kernel_tried = False
_fallback_warned = False
_lock = threading.Lock()


@dataclass
class Int4Weight:
    """Codes (N, K) uint8 in [0, 15]; scale and offset (N, K // group_size) fp32."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"Int4Weight.group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        n, k = self.q.shape
        if k % self.group_size or self.scale.shape != (n, k // self.group_size) != self.offset.shape:
            raise ValueError(
                f"Int4Weight shapes disagree: q {tuple(self.q.shape)}, scale {tuple(self.scale.shape)}, "
                f"offset {tuple(self.offset.shape)}, group_size {self.group_size}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        """fp32 (N, K): the reference the kernel is tested against."""
        n, k = self.q.shape
        g = self.q.float().view(n, k // self.group_size, self.group_size)
        return (g * self.scale[..., None] + self.offset[..., None]).view(n, k)

    def map_rows(self, fn) -> Int4Weight:  # noqa: ANN001
        """Apply a row reordering (e.g. undoing llama.cpp's Q/K permutation) to codes and scales alike."""
        return Int4Weight(fn(self.q), fn(self.scale), fn(self.offset), self.group_size)

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """Stack along output rows (fusing q/k/v or gate/up); inputs must share K and group size."""
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot fuse Int4Weights with different group sizes {sorted(sizes)}")
        return Int4Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.offset for p in parts]),
            parts[0].group_size,
        )


# ----------------------------------------------------------------------------------------------------------------
# Building and loading the C++ op


def _register_fakes() -> None:
    @torch.library.register_fake("rapidlm_int4::gemm")
    def _(x, packed, scales_zeros, out_features, group_size, bias):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("rapidlm_int4::gemm_small")
    def _(x, packed, scales_zeros, out_features, group_size, bias):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("rapidlm_int4::dequantize_matmul")
    def _(x, packed, scales_zeros, out_features, group_size):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("rapidlm_int4::dequantize")
    def _(packed, scales_zeros, out_features, group_size, dtype):  # noqa: ANN001, ANN202
        return packed.new_empty((out_features, packed.shape[1] * CHUNK_K), dtype=dtype)


def load_kernel(verbose: bool = False) -> bool:
    """Build (first time on this machine; cached afterwards) and load the C++ op. False, with one warning, if
    that fails; callers then use the fallback."""
    global _kernel_ready, _kernel_tried
    if _kernel_tried:
        return _kernel_ready
    with _lock:
        if _kernel_tried:
            return _kernel_ready
        _kernel_ready = try_build(
            "rapidlm_int4", _SOURCE, _register_fakes, "PyTorch's int4 kernel (or dequantize + matmul)", verbose
        )
        _kernel_tried = True
    return _kernel_ready


def _use_kernel() -> bool:
    return not FORCE_FALLBACK and load_kernel()


def _torch_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def int4_kernel_available() -> bool:
    """True when a fast int4 path works here: rapidlm's kernel (built on first call) or PyTorch's own."""
    return _use_kernel() or _torch_int4_available()


def _warn_fallback() -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        why = "RAPIDLM_INT4_KERNEL=0" if FORCE_FALLBACK else "the C++ kernel is unavailable"
        how = "PyTorch's _weight_int4pack_mm_for_cpu" if _torch_int4_available() else "dequantize + matmul"
        warnings.warn(f"rapidlm: Int4Linear runs {how} ({why})", RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------------------------------------------
# The kernel's weight layout


def _exact_in_fp16(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t))


def pack_int4(weight: Int4Weight, compact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout (see int4_gemv.cpp): codes (ceil(N/16), K/8, 64) uint8 where chunk c of block b holds
    32 little-endian 16-bit words, word w = 2r + e with nibble i = q[16b + r, 8c + 2i + e]; and scales_zeros
    (ceil(N/16), G, 2, 16) with [b, g, 0, r] = scale[16b + r, g], [b, g, 1, r] = offset[16b + r, g].
    Zero rows pad N to a multiple of 16. scales_zeros is fp32, or (compact) fp16 when every scale and offset
    converts to fp16 exactly, as GGUF's Q4_0/Q4_1 do: the same values in a sixth fewer bytes per weight."""
    n, k = weight.shape
    nb = -(-n // BLOCK_ROWS)
    pad = nb * BLOCK_ROWS - n
    q, scale, offset = weight.q, weight.scale, weight.offset
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        offset = torch.cat([offset, offset.new_zeros(pad, offset.shape[1])])
    # (b, r, c, i, e) -> (b, c, r, e, i): the four nibbles i of word (r, e) last
    q = q.to(torch.uint8).reshape(nb, BLOCK_ROWS, k // CHUNK_K, 4, 2).permute(0, 2, 1, 4, 3)
    lo = q[..., 0] | (q[..., 1] << 4)  # byte 2w: nibbles 0, 1
    hi = q[..., 2] | (q[..., 3] << 4)  # byte 2w + 1: nibbles 2, 3
    packed = torch.stack([lo, hi], dim=-1).reshape(nb, k // CHUNK_K, 64).contiguous()
    g = scale.shape[1]
    sz = torch.stack([scale.float(), offset.float()], dim=1)  # (N, 2, G)
    scales_zeros = sz.reshape(nb, BLOCK_ROWS, 2, g).permute(0, 3, 2, 1).contiguous()
    if compact and _exact_in_fp16(scales_zeros):
        scales_zeros = scales_zeros.half()
    return packed, scales_zeros


def unpack_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, group_size: int) -> Int4Weight:
    """Inverse of pack_int4."""
    nb, chunks = packed.shape[:2]
    b = packed.reshape(nb, chunks, BLOCK_ROWS, 2, 2)  # (b, c, r, e, byte)
    nib = torch.stack([b[..., 0] & 15, b[..., 0] >> 4, b[..., 1] & 15, b[..., 1] >> 4], dim=-1)  # (b, c, r, e, i)
    q = nib.permute(0, 2, 1, 4, 3).reshape(nb * BLOCK_ROWS, chunks * CHUNK_K)[:out_features]
    sz = scales_zeros.float().permute(0, 3, 2, 1).reshape(nb * BLOCK_ROWS, 2, -1)[:out_features]
    return Int4Weight(q.contiguous(), sz[:, 0].contiguous(), sz[:, 1].contiguous(), group_size)


# ----------------------------------------------------------------------------------------------------------------
# The module


class Int4Linear(nn.Module):
    """y = x @ W^T (+ b) with W held as packed int4 codes and per-group fp32 scale / offset (CPU).

    act_dtype is the dtype the kernel computes in: bf16 (fast: bf16 x, fp32 accumulation and scales, bf16 out)
    or fp32 (equals the dequantized weights' matmul up to summation order, used to check native GGUF execution).
    Inputs of another dtype are cast to it and the output cast back.

    With the C++ kernel the weight is held in its packed layout (`packed`, `scales_zeros`: scale and offset per
    group, fp32 or exact fp16); without it in PyTorch's int4pack layout (`packed`, `scales_zeros`: scale and zero
    point in act_dtype) or, without that either, as plain codes (`q`, `scale`, `offset`). One copy of the codes
    either way; the Int4Weight given is not kept.
    """

    def __init__(
        self, weight: Int4Weight, bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        if act_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"Int4Linear.act_dtype must be bfloat16 or float32, got {act_dtype}")
        self.act_dtype = act_dtype
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"Int4Linear bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        # fp32 bias: the kernel adds it to the fp32 accumulator before rounding the output
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        on_cpu = weight.q.device.type == "cpu"
        if on_cpu and _use_kernel():
            self.layout = "rapidlm"
            packed, scales_zeros = pack_int4(weight, compact=COMPACT_SCALES)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_zeros", scales_zeros, persistent=False)
            return
        if on_cpu:
            _warn_fallback()
        if on_cpu and _torch_int4_available():
            self.layout = "torch"
            # The packing wants a multiple of 16 output rows: pad with zero rows, sliced off after the matmul.
            pad = -self.out_features % 16
            q, scale, offset = weight.q, weight.scale, weight.offset
            if pad:
                q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
                scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
                offset = torch.cat([offset, offset.new_zeros(pad, offset.shape[1])])
            self.padded_out = self.out_features + pad
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
            # That kernel computes w = (q - 8) * scale + zero, so zero = offset + 8 * scale (exact in fp32).
            zero = offset.float() + 8 * scale.float()
            scales_zeros = torch.stack([scale.float(), zero], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales_zeros", scales_zeros.to(act_dtype), persistent=False)
        else:
            self.layout = "plain"
            self.register_buffer("q", weight.q.contiguous(), persistent=False)
            self.register_buffer("scale", weight.scale.float().contiguous(), persistent=False)
            self.register_buffer("offset", weight.offset.float().contiguous(), persistent=False)

    def int4_weight(self) -> Int4Weight:
        """The weight as an Int4Weight in plain (N, K) layout (unpacked if need be)."""
        if self.layout == "rapidlm":
            return unpack_int4(self.packed, self.scales_zeros, self.out_features, self.group_size)
        if self.layout == "plain":
            return Int4Weight(self.q, self.scale, self.offset, self.group_size)
        raise NotImplementedError("PyTorch's int4pack layout is not unpacked here")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N), computed in act_dtype
        if x.dtype != self.act_dtype:
            return self.forward(x.to(self.act_dtype)).to(x.dtype)
        if self.layout == "rapidlm" and _kernel_ready and not FORCE_FALLBACK:
            # _buffers / _parameters directly: nn.Module.__getattr__ costs ~0.5 us per tensor, about a quarter
            # of a decode-step matmul's time on this model's smaller matrices
            b = self._buffers
            return torch.ops.rapidlm_int4.gemm.default(
                x, b["packed"], b["scales_zeros"], self.out_features, self.group_size, self._parameters.get("bias")
            )
        if self.layout == "torch":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features), self.packed, self.group_size, self.scales_zeros
            )
            if self.padded_out != self.out_features:
                y = y[:, : self.out_features]
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else (y + self.bias).to(y.dtype)
        # plain layout (or the kernel's, with the kernel switched off since): dequantize + matmul in fp32
        y = F.linear(x.float(), self.int4_weight().dequantize(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"layout={self.layout}"
        )
