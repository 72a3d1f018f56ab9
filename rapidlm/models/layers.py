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
        # Normalise in fp32 whatever the activation dtype: the mean of squares over 576+ values loses too
        # much in bf16. Cast back before the weight multiply, as the HF reference does, so bf16 runs match it.
        # Normalise in fp32 whatever the activation dtype, and cast back before the weight multiply, as the
        # HF reference does. mean(x^2) is taken as ||x||^2 / C: vector_norm is one fast fused reduction on
        # the CPU (~3 us), where pow+mean or F.rms_norm's composite cost 8-16 us per call.
        xf = x.float()
        inv_rms = (torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1] + self.eps).rsqrt()
        return self.weight * (xf * inv_rms).to(x.dtype)


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
    """cos and sin tables (max_len, head_dim) in fp32, halves duplicated (the HF "rotate_half" layout)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, hd) by per-position cos/sin (B, T, 1, hd): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
