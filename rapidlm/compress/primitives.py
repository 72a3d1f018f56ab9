"""Quantization primitives: choose scales/offsets, quantize, dequantize. Everything else builds on these.

One convention throughout: a weight row is cut into groups of `group_size` inputs (group_size == K means one
group per output channel), and inside a group

    w ≈ scale * q + offset,   q an unsigned integer code in [0, 2**bits - 1]

Asymmetric: offset = min(w) (clamped so 0 is representable), scale = (max - min) / (2**bits - 1).
Symmetric:  offset = -2**(bits-1) * scale, scale = absmax / (2**(bits-1) - 1); codes then use
[1, 2**bits - 1], i.e. signed values in [-(2**(bits-1) - 1), 2**(bits-1) - 1], the usual symmetric range.
This is llama.cpp's Q4_1 (asymmetric) and Q4_0/Q8_0 (symmetric) block layout, so GGUF tensors and our own
quantizations share one representation and one set of kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight matrix: bits per code, inputs per group (None = whole row), symmetry."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"QuantSpec.bits must be 2, 3, 4 or 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"QuantSpec.group_size must be a positive int or None, got {self.group_size!r}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, k: int) -> int:
        g = self.group_size or k
        if k % g:
            raise ValueError(f"group_size {g} does not divide the {k} inputs of this weight")
        return k // g


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(N, K) -> (N, G, group) view."""
    n, k = w.shape
    return w.reshape(n, spec.groups(k), k // spec.groups(k))


def choose_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset, each (N, G), in w's dtype (fp32 or fp64), for w (N, K)."""
    g = _grouped(w, spec)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        absmax = g.abs().amax(dim=-1)
        scale = absmax / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
        return scale, -half * scale
    lo = g.amin(dim=-1).clamp(max=0)  # keep 0 representable: zero weights stay exactly zero-ish
    hi = g.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo


def quantize(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes (N, K) uint8 in [0, 2**bits - 1]: round-to-nearest of (w - offset) / scale, clamped."""
    g = _grouped(w, spec)
    q = torch.round((g - offset[..., None]) / scale[..., None])
    lo = 1 if spec.symmetric else 0  # symmetric codes stay within +-(2**(bits-1) - 1)
    return q.clamp_(lo, spec.qmax).reshape(w.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w_hat (N, K) in scale's dtype: scale * q + offset, group by group."""
    g = _grouped(q.to(scale.dtype), spec)
    return (g * scale[..., None] + offset[..., None]).reshape(q.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize with freshly chosen parameters: the error a quantization would make."""
    scale, offset = choose_qparams(w, spec)
    return dequantize(quantize(w, scale, offset, spec), scale, offset, spec)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x (..., K): codes int8 in [-127, 127] and scale (..., 1) fp32."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale
