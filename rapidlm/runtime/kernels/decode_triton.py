"""Fused element-wise kernels for CUDA decode steps, in Triton (rapidlm.runtime.cuda_graphs uses them).

A decode step at batch 1 runs ~30 small kernels per layer in eager PyTorch (RMSNorm alone is 7); on a GPU each
costs a few microseconds even inside a CUDA graph, which adds up to a large share of a 7B model's ~3.5 ms step.
These three kernels leave 6 launches per layer besides the four matmuls:

- `add_rmsnorm_(h, delta, weight, eps)`: h += delta (in place, rounded to h's dtype as eager rounds it), then
  RMSNorm(h) * weight, with the eager model's rounding points (normalise in fp32, round, multiply by the weight).
- `rope_write(qkv, cos, sin, positions, k, v, ...)`: RoPE on q and k of a fused q|k|v row, rotated q returned,
  rotated k and v written into the KV cache at each row's position, dense (B, nkv, S, hd) or paged.
- `silu_mul(gate_up)`: silu(gate) * up of a fused gate|up row.

Results match the eager model's float ops up to rounding (RoPE runs in fp32 and rounds once, where the eager
model rotates in the cache dtype). Triton is optional; see `HAS_TRITON`.
"""

from __future__ import annotations

import torch

from rapidlm.runtime.kernels.paged_attention_triton import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rmsnorm_kernel(
        h_ptr,
        d_ptr,
        w_ptr,
        out_ptr,
        s_h,
        s_d,
        s_o,
        C,
        eps,
        BLOCK: tl.constexpr,
        HAS_DELTA: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < C
        x = tl.load(h_ptr + row * s_h + c, mask=mask, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(d_ptr + row * s_d + c, mask=mask, other=0.0).to(tl.float32)).to(
                h_ptr.dtype.element_ty
            )
            tl.store(h_ptr + row * s_h + c, x, mask=mask)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / C + eps)
        normed = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * s_o + c, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_write_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr,
        s_qkv,
        s_q,
        s_cos,
        s_kb,
        s_kt,
        s_kh,
        s_tb,
        NH: tl.constexpr,
        NKV: tl.constexpr,
        HD: tl.constexpr,
        BS: tl.constexpr,
        PAGED: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)  # head of the fused row: q heads, then k heads, then v heads
        pos = tl.load(pos_ptr + b).to(tl.int64)
        d = tl.arange(0, HD)
        src = qkv_ptr + b * s_qkv + h * HD
        x = tl.load(src + d).to(tl.float32)
        swapped = tl.load(src + (d + HD // 2) % HD).to(tl.float32)  # [x2, x1]; the sign lives in the sin table
        c = tl.load(cos_ptr + pos * s_cos + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * s_cos + d).to(tl.float32)
        rotate = h < NH + NKV
        y = tl.where(rotate, x * c + swapped * s, x)
        is_q = h < NH
        tl.store(q_ptr + b * s_q + h * HD + d, y.to(q_ptr.dtype.element_ty), mask=is_q & (d < HD))
        kvh = tl.where(is_q, 0, (h - NH) % NKV)
        if PAGED:
            blk = tl.load(tables_ptr + b * s_tb + pos // BS).to(tl.int64)
            base = blk * s_kb + (pos % BS) * s_kt + kvh * s_kh
        else:
            base = b * s_kb + pos * s_kt + kvh * s_kh
        is_k = (h >= NH) & rotate
        is_v = h >= NH + NKV
        tl.store(k_ptr + base + d, y.to(k_ptr.dtype.element_ty), mask=is_k & (d < HD))
        tl.store(v_ptr + base + d, y.to(v_ptr.dtype.element_ty), mask=is_v & (d < HD))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, s_gu, s_o, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < F
        g = tl.load(gu_ptr + row * s_gu + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * s_gu + F + i, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds here
        tl.store(out_ptr + row * s_o + i, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def _need_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("rapidlm's fused decode kernels need Triton")


def add_rmsnorm_(
    h: torch.Tensor,  # (B, C) residual stream, updated in place when delta is given
    delta: torch.Tensor | None,  # (B, C) or None
    weight: torch.Tensor,  # (C,)
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # (B, C) normalised, h's dtype
    _need_triton()
    B, C = h.shape
    if out is None:
        out = torch.empty_like(h)
    block = triton.next_power_of_2(C)
    _add_rmsnorm_kernel[(B,)](
        h, delta if delta is not None else h, weight, out,
        h.stride(0), delta.stride(0) if delta is not None else 0, out.stride(0), C, float(eps),
        BLOCK=block, HAS_DELTA=delta is not None, num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
    return out


def rope_write(
    qkv: torch.Tensor,  # (B, (nh + 2 nkv) * hd) one token per row: q | k | v heads
    cos: torch.Tensor,  # (S_max, hd) cos table
    sin: torch.Tensor,  # (S_max, hd) signed sin table (rapidlm.models.layers.rope_tables)
    positions: torch.Tensor,  # (B,) position of each row's token
    k_cache: torch.Tensor,  # dense (B, nkv, S, hd) or a paged pool (num_blocks, bs, nkv, hd)
    v_cache: torch.Tensor,
    nh: int,
    nkv: int,
    hd: int,
    block_tables: torch.Tensor | None = None,  # (B, max_blocks) int32 for a paged pool
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:  # (B, nh, hd) rotated queries in the cache's dtype
    _need_triton()
    B = qkv.shape[0]
    if q_out is None:
        q_out = torch.empty((B, nh, hd), dtype=k_cache.dtype, device=qkv.device)
    paged = block_tables is not None
    if paged:
        bs = k_cache.shape[1]
        s_kb, s_kt, s_kh = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    else:
        bs = 1
        s_kb, s_kt, s_kh = k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)
    if k_cache.stride() != v_cache.stride() or cos.stride() != sin.stride() or qkv.stride(-1) != 1:
        raise ValueError("rope_write: k/v caches and cos/sin tables need matching strides, qkv a contiguous row")
    _rope_write_kernel[(B, nh + 2 * nkv)](
        qkv, cos, sin, positions, q_out, k_cache, v_cache, block_tables if paged else positions,
        qkv.stride(0), q_out.stride(0), cos.stride(0), s_kb, s_kt, s_kh, block_tables.stride(0) if paged else 0,
        NH=nh, NKV=nkv, HD=hd, BS=bs, PAGED=paged, num_warps=1,
    )  # fmt: skip
    return q_out


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2F) fused gate|up -> (B, F) silu(gate) * up."""
    _need_triton()
    B, two_f = gate_up.shape
    f = two_f // 2
    if out is None:
        out = gate_up.new_empty((B, f))
    block = 1024
    _silu_mul_kernel[(B, triton.cdiv(f, block))](gate_up, out, gate_up.stride(0), out.stride(0), f, BLOCK=block)
    return out
