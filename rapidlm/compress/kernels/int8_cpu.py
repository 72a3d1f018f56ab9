"""8-bit weights with fp32 scales (per output channel or per group of K), run by a small C++ kernel on the CPU.

A weight row is split into groups of `group_size` inputs; each group stores int8 codes q and w = scale * q.
With group_size == K this is symmetric per-output-channel int8 (weight-only quantization); with group_size 32
it is llama.cpp's Q8_0 block, so a GGUF file's Q8_0 tensors (the tied output head above all) run as stored.

Decoding a token is bound by the weight bytes it reads, and int8 reads half of bf16. The kernel
(`int8_gemv.cpp`, built on first use with `torch.utils.cpp_extension.load` and cached) streams the codes in a
layout packed once at load (`pack_int8`: 16 output rows x 2 inputs per 32 bytes), widens them in registers and
multiplies each into every row of x (bf16 x: exact bf16 dot products; fp32 x: fp32 FMAs), accumulating in fp32.
bf16 batches above SMALL_M_MAX rows (long prefills) dequantize to bf16 and call `at::linear`, a little faster
there. It is the C++ op `rapidlm_int8::gemm`, so `torch.compile` calls it as an opaque op with no Python between.

Without a working compiler (or with RAPIDLM_INT8_KERNEL=0 in the environment) the same results come from plain
torch ops (one RuntimeWarning says so): `_weight_int8pack_mm` for per-channel weights, else dequantize + matmul.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rapidlm.compress.kernels.build import try_build

_SOURCE = Path(__file__).with_name("int8_gemv.cpp")
# bf16 batches above this many rows dequantize + matmul (kKernelMaxMBf16 in the C++ source; same in the fallback)
SMALL_M_MAX = 512
BLOCK_ROWS = 16  # output rows per packed block (RB in the C++ source)

# Set to True (or RAPIDLM_INT8_KERNEL=0 in the environment) to run the pure-torch path even where the kernel builds.
FORCE_FALLBACK = os.environ.get("RAPIDLM_INT8_KERNEL", "1") == "0"

_kernel_ready = False  # the C++ op is loaded (read on every forward; a plain global so torch.compile can guard on it)
_kernel_tried = False
_lock = threading.Lock()


@dataclass
class Int8Weight:
    """Codes (N, K) int8 (the full range -128..127); scale (N, K // group_size) fp32; w = q * scale per group."""

    q: torch.Tensor
    scale: torch.Tensor
    group_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.q, torch.Tensor) or self.q.dtype != torch.int8 or self.q.dim() != 2:
            got = f"{self.q.dtype} {tuple(self.q.shape)}" if isinstance(self.q, torch.Tensor) else type(self.q).__name__
            raise ValueError(f"Int8Weight.q must be a 2-D (N, K) int8 tensor, got {got}")
        n, k = self.q.shape
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"Int8Weight.group_size must be a positive int, got {self.group_size!r}")
        if k == 0 or k % self.group_size:
            raise ValueError(f"Int8Weight.group_size {self.group_size} must divide K = {k}")
        if not isinstance(self.scale, torch.Tensor) or self.scale.dtype != torch.float32:
            got = self.scale.dtype if isinstance(self.scale, torch.Tensor) else type(self.scale).__name__
            raise ValueError(f"Int8Weight.scale must be an fp32 tensor, got {got}")
        if tuple(self.scale.shape) != (n, k // self.group_size):
            raise ValueError(
                f"Int8Weight.scale must have shape (N, K // group_size) = {(n, k // self.group_size)}, "
                f"got {tuple(self.scale.shape)} (q {tuple(self.q.shape)}, group_size {self.group_size})"
            )
        if self.scale.device != self.q.device:
            raise ValueError(f"Int8Weight.scale is on {self.scale.device} but q is on {self.q.device}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        """fp32 (N, K): the reference the kernel is tested against."""
        n, k = self.q.shape
        g = self.q.float().view(n, k // self.group_size, self.group_size)
        return (g * self.scale[..., None]).view(n, k)

    def map_rows(self, fn) -> Int8Weight:  # noqa: ANN001
        """Apply a row reordering (e.g. undoing llama.cpp's Q/K permutation) to codes and scales alike."""
        return Int8Weight(fn(self.q), fn(self.scale), self.group_size)

    @staticmethod
    def cat(parts: list[Int8Weight]) -> Int8Weight:
        """Stack along output rows (fusing q/k/v or gate/up); inputs must share K and group size."""
        sizes = {p.group_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot fuse Int8Weights with different group sizes {sorted(sizes)}")
        ks = {p.q.shape[1] for p in parts}
        if len(ks) != 1:
            raise ValueError(f"cannot fuse Int8Weights with different K {sorted(ks)}")
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), parts[0].group_size)


# ----------------------------------------------------------------------------------------------------------------
# Building and loading the C++ op


def _register_fakes() -> None:
    @torch.library.register_fake("rapidlm_int8::gemm")
    def _(x, packed, packed_scale, out_features, group_size, bias):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("rapidlm_int8::gemm_small")
    def _(x, packed, packed_scale, out_features, group_size):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("rapidlm_int8::dequantize_matmul")
    def _(x, packed, packed_scale, out_features, group_size):  # noqa: ANN001, ANN202
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("rapidlm_int8::dequantize")
    def _(packed, packed_scale, out_features, group_size, dtype):  # noqa: ANN001, ANN202
        return packed.new_empty((out_features, packed.shape[1] * 2), dtype=dtype)


def load_kernel(verbose: bool = False) -> bool:
    """Build (first time on this machine; cached afterwards) and load the C++ op. False, with one warning, if
    that fails; callers then use the pure-torch path."""
    global _kernel_ready, _kernel_tried
    if _kernel_tried:
        return _kernel_ready
    with _lock:
        if _kernel_tried:
            return _kernel_ready
        _kernel_ready = try_build("rapidlm_int8", _SOURCE, _register_fakes, "dequantize + matmul", verbose)
        _kernel_tried = True
    return _kernel_ready


def int8_kernel_available() -> bool:
    """True when the fast path works on this machine (builds the kernel on first call)."""
    return not FORCE_FALLBACK and load_kernel()


# ----------------------------------------------------------------------------------------------------------------
# The kernel's weight layout


def pack_int8(weight: Int8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout: codes (ceil(N/16), K/2, 16, 2) int8 with packed[b, j, r, p] = q[16b + r, 2j + p]
    (zero rows pad N to a multiple of 16) and scales (ceil(N/16), G, 16) fp32 with [b, g, r] = scale[16b + r, g].
    The group size must be even (Int8Linear pads odd groups first)."""
    n, k = weight.shape
    if weight.group_size % 2:
        raise ValueError(f"pack_int8 needs an even group_size, got {weight.group_size}")
    nb = -(-n // BLOCK_ROWS)
    pad = nb * BLOCK_ROWS - n
    q = torch.cat([weight.q, weight.q.new_zeros(pad, k)]) if pad else weight.q
    s = torch.cat([weight.scale, weight.scale.new_zeros(pad, weight.scale.shape[1])]) if pad else weight.scale
    packed = q.reshape(nb, BLOCK_ROWS, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    packed_scale = s.reshape(nb, BLOCK_ROWS, -1).permute(0, 2, 1).contiguous()
    return packed, packed_scale


def unpack_int8(packed: torch.Tensor, packed_scale: torch.Tensor, out_features: int, group_size: int) -> Int8Weight:
    """Inverse of pack_int8."""
    nb, half_k = packed.shape[:2]
    q = packed.permute(0, 2, 1, 3).reshape(nb * BLOCK_ROWS, half_k * 2)[:out_features]
    scale = packed_scale.permute(0, 2, 1).reshape(nb * BLOCK_ROWS, -1)[:out_features]
    return Int8Weight(q.contiguous(), scale.contiguous(), group_size)


def _pad_odd_groups(weight: Int8Weight) -> Int8Weight:
    """Odd group sizes get one zero code per group (x gets a zero input to match): inputs come in pairs."""
    n, k = weight.shape
    g = k // weight.group_size
    q = torch.cat([weight.q.view(n, g, weight.group_size), weight.q.new_zeros(n, g, 1)], dim=2)
    return Int8Weight(q.view(n, -1), weight.scale, weight.group_size + 1)


# ----------------------------------------------------------------------------------------------------------------
# The pure-torch path (same results within rounding)


def int8_linear_reference(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with plain torch ops: fp32 accumulation (as the kernel), except bf16 batches above
    SMALL_M_MAX rows, which use bf16 weights (as the kernel's dequantize path)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.dtype == torch.bfloat16 and x2.shape[0] > SMALL_M_MAX:
        y = F.linear(x2, weight.dequantize().to(torch.bfloat16))
    elif weight.group_size == k:
        y = torch.ops.aten._weight_int8pack_mm(x2.float(), weight.q, weight.scale.view(n))
    else:
        y = F.linear(x2.float(), weight.dequantize())
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).view(*x.shape[:-1], n)


class Int8Linear(nn.Module):
    """y = x @ W^T (+ b) with W held as int8 codes and fp32 scales (CPU; x fp32 or bf16, y in x's dtype).

    With the kernel, the codes are held in its packed layout (`packed`, `packed_scale`); without it, as given
    (`q`, `scale`). Either way the module holds one copy of the int8 codes."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = weight.group_size
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"Int8Linear bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.packed_group_size = weight.group_size + weight.group_size % 2
        self.is_packed = not FORCE_FALLBACK and load_kernel() and weight.q.device.type == "cpu"
        if self.is_packed:
            packed, packed_scale = pack_int8(_pad_odd_groups(weight) if weight.group_size % 2 else weight)
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("packed_scale", packed_scale, persistent=False)
        else:
            self.register_buffer("q", weight.q.contiguous(), persistent=False)
            self.register_buffer("scale", weight.scale.contiguous(), persistent=False)

    def int8_weight(self) -> Int8Weight:
        """The weight as an Int8Weight in plain (N, K) layout (unpacked if need be)."""
        if not self.is_packed:
            return Int8Weight(self.q, self.scale, self.group_size)
        w = unpack_int8(self.packed, self.packed_scale, self.out_features, self.packed_group_size)
        if self.packed_group_size != self.group_size:  # drop the padding codes of odd groups
            n, g = self.out_features, self.in_features // self.group_size
            w = Int8Weight(w.q.view(n, g, -1)[..., : self.group_size].reshape(n, -1), w.scale, self.group_size)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) fp32/bf16 -> (..., N) same dtype
        if self.is_packed and _kernel_ready and not FORCE_FALLBACK:
            if self.packed_group_size != self.group_size:
                g = self.in_features // self.group_size
                x = F.pad(x.reshape(*x.shape[:-1], g, self.group_size), (0, 1)).flatten(-2)
            return torch.ops.rapidlm_int8.gemm(
                x, self.packed, self.packed_scale, self.out_features, self.packed_group_size, self.bias
            )
        return int8_linear_reference(x, self.int8_weight(), self.bias)

    def extra_repr(self) -> str:
        layout = "packed" if self.is_packed else "plain"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"layout={layout}"
        )
