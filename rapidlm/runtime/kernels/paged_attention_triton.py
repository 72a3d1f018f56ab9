"""Paged-attention decode on CUDA, in Triton: one query token per sequence, keys/values read in place.

Same contract as the CPU op (rapidlm.runtime.kernels.paged_attention.paged_attention_decode):
    paged_attention_decode(q (B, nh, hd), k_pool, v_pool, block_tables, seq_lens, scale, window=0) -> (B, nh, hd)
with pools (num_blocks, block_size, nkv, hd), block tables int32 (B, max_blocks), seq_lens int32 (B,), query head
h reading kv head h // (nh // nkv), and sequence b attending to positions [max(0, len - window), len). Inputs may
be fp32, bf16 or fp16; scores, softmax and sums run in fp32; the result has q's dtype.

Flash-decoding: the positions a sequence may read are cut into `num_splits` splits; one program per (row, head,
split) streams its split in BLOCK_T-token tiles with an online softmax and writes a partial (max, sum, acc), and a
second kernel combines the splits. With few rows (batch-1 decode) the splits keep the GPU busy; with many rows one
split is enough and the first kernel writes the result directly. The number of splits depends only on shapes
known on the host (the table width or the dense capacity), never on seq_lens, so the launch can be captured in a
CUDA graph and replayed at every position.

`dense_attention_decode` runs the same kernels over a dense cache (B, nkv, S, hd) (rapidlm's StaticKVCache rows)
with per-row lengths from a device tensor: rapidlm.runtime.cuda_graphs uses it for graph-captured decode.

Triton is optional: without it (CPU-only installs, CI) `decode_kernel_available()` is False and the importers fall
back to their pure-torch paths.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs run without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

BLOCK_T = 64  # tokens per tile inside a split


def decode_kernel_available() -> bool:
    """True when the Triton kernel can run here: Triton importable and a CUDA device present."""
    return HAS_TRITON and torch.cuda.is_available()


@functools.cache
def _sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(rows_times_heads: int, max_tokens: int, device: torch.device | None = None) -> tuple[int, int]:
    """(num_splits, split_tokens) for rows*heads programs over at most `max_tokens` positions: about four
    programs per multiprocessor. The split is BLOCK_T times a power of two (a compile-time constant of the
    kernel, so only a few values ever get compiled); the number of splits is a run-time argument."""
    max_tokens = max(1, max_tokens)
    sms = _sm_count(device.index or 0 if device is not None and device.type == "cuda" else 0)
    want = max(1, -(-4 * sms // max(1, rows_times_heads)))
    split = BLOCK_T
    while -(-max_tokens // split) > want:
        split *= 2
    return -(-max_tokens // split), split


if HAS_TRITON:

    @triton.jit
    def _attn_split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        tables_ptr,
        lens_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        scale,
        window,
        s_qb,
        s_qh,
        s_kb,  # paged: stride of a pool block; dense: stride of a batch row
        s_kt,  # paged: stride of a slot in a block; dense: stride of a position
        s_kh,  # stride of a kv head
        s_tb,  # stride of a block-table row
        s_ob,
        s_oh,
        NS,
        NH: tl.constexpr,
        GROUP: tl.constexpr,
        HD: tl.constexpr,
        BS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_T: tl.constexpr,
        PAGED: tl.constexpr,
        ONE_SPLIT: tl.constexpr,
    ):
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // NH
        h = bh % NH
        kvh = h // GROUP
        seq_len = tl.load(lens_ptr + b).to(tl.int32)
        start = tl.maximum(seq_len - window, 0)  # window = 2**30 for none (set by the host)
        lo = tl.maximum(sp * SPLIT, start)
        hi = tl.minimum(sp * SPLIT + SPLIT, seq_len)

        d = tl.arange(0, HD)
        q = tl.load(q_ptr + b.to(tl.int64) * s_qb + h * s_qh + d).to(tl.float32) * scale
        m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([HD], dtype=tl.float32)
        # A trip count fixed at compile time (the interpreter cannot loop over run-time bounds); tiles wholly
        # outside [lo, hi) are skipped, and every tile entered holds at least one position to attend to.
        for i in range(0, SPLIT // BLOCK_T):
            t0 = sp * SPLIT + i * BLOCK_T
            if (t0 < hi) & (t0 + BLOCK_T > lo):
                t = t0 + tl.arange(0, BLOCK_T)
                valid = (t >= lo) & (t < hi)
                if PAGED:
                    blk = tl.load(tables_ptr + b.to(tl.int64) * s_tb + t // BS, mask=valid, other=0)
                    row = blk.to(tl.int64) * s_kb + (t % BS).to(tl.int64) * s_kt
                else:
                    row = b.to(tl.int64) * s_kb + t.to(tl.int64) * s_kt
                offs = row[:, None] + kvh * s_kh + d[None, :]
                k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                s = tl.sum(k * q[None, :], axis=1)
                s = tl.where(valid, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=0))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new)
                v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
                acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
                l_i = l_i * alpha + tl.sum(p, axis=0)
                m_i = m_new
        if ONE_SPLIT:
            o = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)
            tl.store(out_ptr + b.to(tl.int64) * s_ob + h * s_oh + d, o.to(out_ptr.dtype.element_ty))
        else:
            idx = bh.to(tl.int64) * NS + sp
            one = tl.arange(0, 1)
            tl.store(m_ptr + idx + one, m_i)
            tl.store(l_ptr + idx + one, l_i)
            tl.store(acc_ptr + idx * HD + d, acc, mask=tl.max(l_i, axis=0) > 0)

    @triton.jit
    def _attn_combine_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        s_ob,
        s_oh,
        NS,
        NH: tl.constexpr,
        NS_P2: tl.constexpr,
        HD: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // NH
        h = bh % NH
        s = tl.arange(0, NS_P2)
        d = tl.arange(0, HD)
        in_range = s < NS
        base = bh.to(tl.int64) * NS
        m = tl.load(m_ptr + base + s, mask=in_range, other=float("-inf"))
        lsum = tl.load(l_ptr + base + s, mask=in_range, other=0.0)
        used = lsum > 0
        m_max = tl.max(tl.where(used, m, float("-inf")), axis=0)
        w = tl.where(used, tl.exp(tl.where(used, m, 0.0) - tl.where(used, m_max, 0.0)), 0.0)
        total = tl.sum(w * lsum, axis=0)
        acc = tl.load(acc_ptr + (base + s)[:, None] * HD + d[None, :], mask=used[:, None], other=0.0)
        o = tl.sum(w[:, None] * acc, axis=0)
        o = tl.where(total > 0, o / tl.where(total > 0, total, 1.0), 0.0)
        tl.store(out_ptr + b.to(tl.int64) * s_ob + h * s_oh + d, o.to(out_ptr.dtype.element_ty))


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: torch.Tensor | None,
    seq_lens: torch.Tensor,
    scale: float,
    window: int,
    strides: tuple[int, int, int],  # (row/block, position/slot, kv head) strides of k and v
    block_size: int,
    max_tokens: int,
    nkv: int,
    out: torch.Tensor | None,
) -> torch.Tensor:
    B, nh, hd = q.shape
    if hd & (hd - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two head dim, got {hd}")
    if nkv == 0 or nh % nkv:
        raise ValueError(f"nh ({nh}) must be a multiple of nkv ({nkv})")
    if q.stride(2) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k.stride() != v.stride():
        raise ValueError("q, k and v need a contiguous last dim, and k and v the same strides")
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    ns, split = choose_splits(B * nh, max_tokens, q.device)
    paged = tables is not None
    tables_arg = tables if paged else seq_lens  # unused when dense
    s_tb = tables.stride(0) if paged else 0
    if ns == 1:
        m = lsum = acc = out  # unused
    else:
        m = torch.empty((B * nh, ns), dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        acc = torch.empty((B * nh, ns, hd), dtype=torch.float32, device=q.device)
    _attn_split_kernel[(B * nh, ns)](
        q, k, v, tables_arg, seq_lens, m, lsum, acc, out,
        float(scale), int(window) if window > 0 else 1 << 30,
        q.stride(0), q.stride(1), strides[0], strides[1], strides[2], s_tb, out.stride(0), out.stride(1), ns,
        NH=nh, GROUP=nh // nkv, HD=hd, BS=block_size, SPLIT=split, BLOCK_T=BLOCK_T,
        PAGED=paged, ONE_SPLIT=ns == 1,
        num_warps=4,
    )  # fmt: skip
    if ns > 1:
        _attn_combine_kernel[(B * nh,)](
            m, lsum, acc, out, out.stride(0), out.stride(1), ns,
            NH=nh, NS_P2=triton.next_power_of_2(ns), HD=hd, num_warps=4,
        )  # fmt: skip
    return out


def paged_attention_decode(
    q: torch.Tensor,  # (B, nh, hd), one query token per sequence
    k_pool: torch.Tensor,  # (num_blocks, block_size, nkv, hd)
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    seq_lens: torch.Tensor,  # (B,) int32
    scale: float,
    window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # (B, nh, hd) in q's dtype; zeros for a sequence of length 0
    """softmax(scale * q k^T) v over each sequence's window of the paged pool (see the module docstring)."""
    if not HAS_TRITON:
        raise RuntimeError("paged_attention_decode (CUDA) needs Triton")
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool/v_pool must both be (num_blocks, block_size, nkv, hd), got {tuple(k_pool.shape)}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    bs, nkv = k_pool.shape[1], k_pool.shape[2]
    strides = (k_pool.stride(0), k_pool.stride(1), k_pool.stride(2))
    max_tokens = block_tables.shape[1] * bs
    return _launch(q, k_pool, v_pool, block_tables, seq_lens, scale, window, strides, bs, max_tokens, nkv, out)


def dense_attention_decode(
    q: torch.Tensor,  # (B, nh, hd)
    k: torch.Tensor,  # (B, nkv, S, hd): rows of a dense cache, any strides with a contiguous last dim
    v: torch.Tensor,
    seq_lens: torch.Tensor,  # (B,) int32 on the device: row b attends to positions [max(0, len - window), len)
    scale: float,
    window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same decode attention over a dense cache; the launch depends only on S, not on seq_lens."""
    if not HAS_TRITON:
        raise RuntimeError("dense_attention_decode needs Triton")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k/v must both be (B, nkv, S, hd), got {tuple(k.shape)}")
    strides = (k.stride(0), k.stride(2), k.stride(1))
    return _launch(q, k, v, None, seq_lens, scale, window, strides, 1, k.shape[2], k.shape[1], out)
