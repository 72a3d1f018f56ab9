"""W8A8 dynamic: int8 weights (per output channel) times int8 activations quantized per token at run time.

On a CPU with AVX512-VNNI the GEMM is rapidlm's own C++ op `rapidlm_w8a8::gemm` (`w8a8_gemm.cpp`, built on first
use and cached like the int4/int8 kernels): it quantizes each row of x itself, multiplies int8 by int8 with
vpdpbusd into exact int32 sums (so batched == single), and scales the result back, in one call with no Python
between. The weight is packed once at load (`pack_w8a8`: 16 rows x 4 inputs per 64 bytes, plus row sums).

Elsewhere it uses fbgemm (`quantized::linear_dynamic`), which quantizes the activation tensor with one range:
dividing each token by its own absmax first makes that range the same for every row (per-token quantization),
and the output row is multiplied back. Without either (or with RAPIDLM_W8A8_KERNEL=0 and no fbgemm) the same
arithmetic runs as a float reference.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from rapidlm.compress.kernels.build import try_build
from rapidlm.compress.primitives import quantize_per_token_int8

_SOURCE = Path(__file__).with_name("w8a8_gemm.cpp")
BLOCK_ROWS = 16  # output rows per packed block (RB in the C++ source)
GROUP = 4  # inputs per int32 lane of vpdpbusd (KG in the C++ source)

# Set to True (or RAPIDLM_W8A8_KERNEL=0 in the environment) to skip rapidlm's kernel even where it builds.
FORCE_FALLBACK = os.environ.get("RAPIDLM_W8A8_KERNEL", "1") == "0"

_kernel_ready = False  # the C++ op is loaded and uses VNNI (read on every forward; a plain global for torch.compile)
_kernel_tried = False
_lock = threading.Lock()


@functools.cache
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


@functools.cache
def _has_vnni() -> bool:
    """fbgemm's AVX2 int8 path accumulates pairs in int16 and can saturate at full 8-bit range; VNNI cannot."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_vnni" in flags or "avx_vnni" in flags
    except OSError:
        return False


def _register_fakes() -> None:
    @torch.library.register_fake("rapidlm_w8a8::gemm")
    def _(x, packed, wsum, scale, out_features, bias):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], out_features))


def load_kernel(verbose: bool = False) -> bool:
    """Build (first time on this machine) and load the C++ op; True when it loaded. One warning if it fails."""
    global _kernel_tried, _kernel_ready
    if _kernel_tried:
        return _kernel_ready
    with _lock:
        if not _kernel_tried:
            ok = try_build("rapidlm_w8a8", _SOURCE, _register_fakes, "fbgemm or the float reference", verbose)
            # The op is correct everywhere; it is only fast with VNNI, so without it fbgemm is preferred.
            _kernel_ready = ok and torch.ops.rapidlm_w8a8.simd() == "avx512-vnni"
            _kernel_tried = True
    return _kernel_ready


def w8a8_kernel_available() -> bool:
    """True when rapidlm's VNNI kernel runs W8A8 on this machine (builds it on first call)."""
    return not FORCE_FALLBACK and load_kernel()


def pack_w8a8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's layout: codes (ceil(N/16), ceil(K/4), 16, 4) int8 with packed[b, j, r, p] = q[16b + r, 4j + p]
    (zero rows and columns pad N and K), row sums (N padded) int32 and scales (N padded) fp32."""
    n, k = q.shape
    nb, k4 = -(-n // BLOCK_ROWS), -(-k // GROUP)
    qp = q.new_zeros(nb * BLOCK_ROWS, k4 * GROUP)
    qp[:n, :k] = q
    packed = qp.view(nb, BLOCK_ROWS, k4, GROUP).permute(0, 2, 1, 3).contiguous()
    wsum = qp.sum(dim=1, dtype=torch.int32)
    sp = scale.new_zeros(nb * BLOCK_ROWS, dtype=torch.float32)
    sp[:n] = scale
    return packed, wsum, sp


def unpack_w8a8(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of pack_w8a8 for the codes: (N, K) int8."""
    nb, k4 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(nb * BLOCK_ROWS, k4 * GROUP)[:out_features, :in_features].contiguous()


class W8A8Linear(nn.Module):
    """y = dynamic_int8(x) @ (q * scale)^T (+ b); q (N, K) int8 in [-127, 127], scale (N,) fp32."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"W8A8Linear.q must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        if scale.shape != (q.shape[0],):
            raise ValueError(f"W8A8Linear.scale must have shape ({q.shape[0]},), got {tuple(scale.shape)}")
        self.out_features, self.in_features = q.shape
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._packed = None
        self.backend = "reference"
        if q.device.type == "cpu" and w8a8_kernel_available():
            self.backend = "rapidlm-vnni"
            packed, wsum, sp = pack_w8a8(q, scale.float())
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("wsum", wsum, persistent=False)
            self.register_buffer("packed_scale", sp, persistent=False)
        else:
            self.register_buffer("_q", q, persistent=False)
            if q.device.type == "cpu" and fbgemm_available():
                self.backend = "fbgemm"
                with warnings.catch_warnings():  # quantized tensor creation is flagged deprecated; fbgemm needs it
                    warnings.simplefilter("ignore")
                    zero = torch.zeros(self.out_features, dtype=torch.long)
                    wq = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
                    self._packed = torch.ops.quantized.linear_prepack(wq, self.bias)
                self._reduce_range = not _has_vnni()
        self.register_buffer("scale", scale.float(), persistent=False)

    @property
    def q(self) -> torch.Tensor:
        """The codes (N, K) int8 (unpacked from the kernel's layout if need be)."""
        if self.backend == "rapidlm-vnni":
            return unpack_w8a8(self.packed, self.out_features, self.in_features)
        return self._q

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The arithmetic in float: per-token int8 x, per-channel int8 W."""
        xq, xs = quantize_per_token_int8(x)
        y = (xq.float() * xs) @ (self.q.float() * self.scale[:, None]).T
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N) in x's dtype
        if self.backend == "rapidlm-vnni" and _kernel_ready and x.dtype in (torch.float32, torch.bfloat16):
            return torch.ops.rapidlm_w8a8.gemm(
                x, self.packed, self.wsum, self.packed_scale, self.out_features, self.bias
            )
        return self._forward_fallback(x)

    @torch.compiler.disable  # fbgemm's packed weight is an opaque object Dynamo cannot trace
    def _forward_fallback(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self._packed is None:
            y = self.reference(x2.float())
        else:
            # Per-token range in one kernel (max |x| over the row), then the row scaled into [-1, 1] in place on
            # the fp32 copy: 5 small ops around fbgemm's GEMM (the per-call cost matters at decode sizes).
            s = torch.linalg.vector_norm(x2, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
            s.clamp_(min=1e-8)
            xn = x2.float() if x2.dtype != torch.float32 else x2.clone()
            y = torch.ops.quantized.linear_dynamic(xn.div_(s), self._packed, self._reduce_range)
            y = y.mul_(s) if self.bias is None else y.sub_(self.bias).mul_(s).add_(self.bias)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"
