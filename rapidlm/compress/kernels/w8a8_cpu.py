"""W8A8 dynamic: int8 weights (per output channel) times int8 activations quantized per token at run time.

On the CPU the int8 x int8 GEMM is fbgemm's (`quantized::linear_dynamic`), the fastest int8 path PyTorch has
here (measured for 3072x576: 0.098 ms at 8 tokens vs 0.163 bf16 oneDNN and 0.371 `_weight_int8pack_mm`).
fbgemm quantizes the activation tensor with one range; dividing each token by its own absmax first makes that
range the same for every row, i.e. per-token quantization, and the output row is multiplied back.
Elsewhere (or without fbgemm) the same arithmetic runs as a float reference.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from rapidlm.compress.primitives import quantize_per_token_int8


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


class W8A8Linear(nn.Module):
    """y = dynamic_int8(x) @ (q * scale)^T (+ b); q (N, K) int8 in [-127, 127], scale (N,) fp32."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"W8A8Linear.q must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        if scale.shape != (q.shape[0],):
            raise ValueError(f"W8A8Linear.scale must have shape ({q.shape[0]},), got {tuple(scale.shape)}")
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._packed = None
        if q.device.type == "cpu" and fbgemm_available():
            with warnings.catch_warnings():  # quantized tensor creation is flagged deprecated; fbgemm needs it
                warnings.simplefilter("ignore")
                zero = torch.zeros(self.out_features, dtype=torch.long)
                wq = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(wq, self.bias)
            self._reduce_range = not _has_vnni()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The arithmetic in float: per-token int8 x, per-channel int8 W."""
        xq, xs = quantize_per_token_int8(x)
        y = (xq.float() * xs) @ (self.q.float() * self.scale[:, None]).T
        return y if self.bias is None else y + self.bias

    @torch.compiler.disable  # fbgemm's packed weight is an opaque object Dynamo cannot trace
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N) in x's dtype
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
        backend = "fbgemm" if self._packed is not None else "reference"
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={backend}"
