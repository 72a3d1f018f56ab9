"""4-bit weights with per-group affine scales, run by PyTorch's int4 CPU kernel (bf16 activations).

A weight row is split into groups of `group_size` inputs; each group stores 4-bit codes q in [0, 15] and
w = scale * q + offset. This is exactly llama.cpp's Q4_0 (offset = -8 * scale) and Q4_1 (offset = min)
blocks, so a GGUF file's 4-bit tensors run as stored instead of being inflated to 16 bits: a decode step reads
a quarter of the bytes (measured here: 0.065 ms vs 0.166 ms for a 3072x576 matmul at one token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` supports


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


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Linear(nn.Module):
    """y = x @ W^T (+ b) with W held as packed int4 codes and per-group scale/zero (CPU).

    act_dtype is the dtype the kernel computes in: bf16 (fast: ~10x fp32 here; scales rounded to bf16) or
    fp32 (exact scales: equals the dequantized weights' matmul, used to check native GGUF execution).
    Inputs of another dtype are cast to it and the output cast back.
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
        # The packing wants a multiple of 16 output rows: pad with zero rows, sliced off after the matmul.
        pad = -self.out_features % 16
        q, scale, offset = weight.q, weight.scale, weight.offset
        if pad:
            q = torch.cat([q, q.new_zeros(pad, q.shape[1])])
            scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
            offset = torch.cat([offset, offset.new_zeros(pad, offset.shape[1])])
        self.padded_out = self.out_features + pad
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # The kernel computes w = (q - 8) * scale + zero, so zero = offset + 8 * scale (exact in fp32).
        weight = Int4Weight(q, scale, offset, self.group_size)
        zero = weight.offset + 8 * weight.scale
        scales_zeros = torch.stack([weight.scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros.to(act_dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(act_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N), computed with bf16 activations
        if x.dtype != self.act_dtype:
            return self.forward(x.to(self.act_dtype)).to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features), self.packed, self.group_size, self.scales_zeros
        )
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
