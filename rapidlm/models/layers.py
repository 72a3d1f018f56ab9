"""Small building blocks shared by the decoder models: RMSNorm and rotary position embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from rapidlm.config import RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, rounding to it once before the weight multiply, as
        # the HF reference does. mean(x^2) is taken as ||x||^2 / C: vector_norm reduces in fp32 without an fp32
        # copy of x and is one fast kernel on the CPU (~3 us), where pow+mean or F.rms_norm's composite cost
        # 8-16 us a call. Small in-place ops and mul(out=) keep this at 7 kernels: a decode step runs 61 norms.
        inv_rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # Training (distillation): the same arithmetic, out of place, so autograd can follow it.
            inv_rms = torch.rsqrt(inv_rms.square() / x.shape[-1] + self.eps)
            return self.weight * (x.float() * inv_rms).to(x.dtype)
        inv_rms.square_().div_(x.shape[-1]).add_(self.eps).rsqrt_()
        normed = torch.mul(x, inv_rms, out=torch.empty_like(x))  # computed in fp32, rounded to x's dtype
        return self.weight * normed


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, after the configured scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        # Llama 3.1: wavelengths longer than old_ctx/low_freq_factor are slowed by `factor`, shorter than
        # old_ctx/high_freq_factor are kept, and the band between is interpolated smoothly.
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_tables(head_dim: int, theta: float, scaling: RopeScaling, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables (max_len, head_dim) in fp32 for the HF "rotate_half" layout.

    cos = [cos f, cos f]; the sin table carries rotate_half's sign, [-sin f, sin f], so apply_rope needs no neg.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (S, hd/2)
    return torch.cat((freqs.cos(), freqs.cos()), dim=-1), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by per-position tables (B, T, 1, hd) from rope_tables.

    Equals HF's x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1]: the sign lives in the table, so
    this is swap halves + mul + fused multiply-add (3 kernels instead of 5).
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [x2, x1]
    return torch.addcmul(x * cos, swapped, signed_sin)
