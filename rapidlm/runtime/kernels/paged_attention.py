"""Paged-attention decode on the CPU: one query token per sequence, keys and values read in place from the pool.

A paged KV cache keeps every sequence's keys and values in fixed-size blocks of one shared pool
(num_blocks, block_size, nkv, hd); sequence b's logical position p lives at pool[block_tables[b, p // bs], p % bs].
Decoding with plain torch has to gather each sequence's blocks into a dense copy, build a mask and run SDPA: the
copy alone moves all of the context twice. rapidlm's C++ op `rapidlm_paged::decode` (`paged_attention.cpp`, built
on first use with `torch.utils.cpp_extension.load` and cached like the quantized-matmul kernels) reads each block
where it lies instead: it splits the work over (sequence, kv head) pairs, runs the query heads of a GQA group
together so each key/value row is read from memory once, and does a two-pass fp32 softmax with vectorized dot
products and axpys. The pools may be fp32 or bf16 (half the bytes to read; rows are widened to fp32 in registers,
everything accumulates in fp32); q and the output are fp32. `torch.compile` sees it as an opaque op (a fake kernel
gives the output's shape).

`paged_attention_reference` is the same function in plain torch (gather, mask, SDPA in fp64): the tests' reference
and the fallback when the extension cannot be built (one RuntimeWarning says so) or RAPIDLM_PAGED_KERNEL=0.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from rapidlm.compress.kernels.build import try_build

_SOURCE = Path(__file__).with_name("paged_attention.cpp")

# Set to True (or RAPIDLM_PAGED_KERNEL=0 in the environment) to run the pure-torch reference even where the
# kernel builds.
FORCE_FALLBACK = os.environ.get("RAPIDLM_PAGED_KERNEL", "1") == "0"

_kernel_ready = False  # the C++ op is loaded (read on every call; a plain global so torch.compile can guard on it)
_kernel_tried = False
_lock = threading.Lock()
_POOL_DTYPES = (torch.float32, torch.bfloat16)


def _register_fakes() -> None:
    @torch.library.register_fake("rapidlm_paged::decode")
    def _(q, k_pool, v_pool, block_tables, seq_lens, scale, window=0):  # noqa: ANN001, ANN202
        torch._check(q.dim() == 3, lambda: "rapidlm_paged::decode: q must be (B, nh, hd)")
        torch._check(q.dtype == torch.float32, lambda: "rapidlm_paged::decode: q must be float32")
        torch._check(
            k_pool.dtype in _POOL_DTYPES and v_pool.dtype == k_pool.dtype,
            lambda: "rapidlm_paged::decode: k_pool and v_pool must both be float32 or both bfloat16",
        )
        return q.new_empty(q.shape)


def load_kernel(verbose: bool = False) -> bool:
    """Build (first time on this machine) and load the C++ op; True when it loaded. One warning if it fails."""
    global _kernel_ready, _kernel_tried
    if _kernel_tried:
        return _kernel_ready
    with _lock:
        if not _kernel_tried:
            _kernel_ready = try_build("rapidlm_paged", _SOURCE, _register_fakes, "gather + SDPA", verbose)
            _kernel_tried = True
    return _kernel_ready


def decode_kernel_available() -> bool:
    """True when `paged_attention_decode` runs rapidlm's C++ kernel here (builds it on first call)."""
    return not FORCE_FALLBACK and load_kernel()


def paged_attention_decode(
    q: torch.Tensor,  # (B, nh, hd) fp32, one query token per sequence
    k_pool: torch.Tensor,  # (num_blocks, block_size, nkv, hd) fp32 or bf16, contiguous
    v_pool: torch.Tensor,  # same shape and dtype
    block_tables: torch.Tensor,  # (B, max_blocks) int32; row b lists sequence b's physical blocks in order
    seq_lens: torch.Tensor,  # (B,) int32; sequence b attends to logical positions [max(0, len - window), len)
    scale: float,  # softmax scale, usually hd ** -0.5
    window: int = 0,  # sliding window (0 = none)
) -> torch.Tensor:  # (B, nh, hd) fp32; zeros for a sequence of length 0
    """softmax(scale * q k^T) v over each sequence's window of the paged pool, one query token per sequence.

    Query head h reads kv head h // (nh // nkv). Table entries outside a sequence's window are never read (they may
    hold anything); entries inside it must be blocks of the pool. Bad dtypes or shapes raise RuntimeError (the
    kernel) or ValueError (the reference)."""
    if not _kernel_tried and not FORCE_FALLBACK and not torch.compiler.is_compiling():
        load_kernel()
    if _kernel_ready and not FORCE_FALLBACK:
        return torch.ops.rapidlm_paged.decode(q, k_pool, v_pool, block_tables, seq_lens, scale, window)
    return paged_attention_reference(q, k_pool, v_pool, block_tables, seq_lens, scale, window)


def _check_inputs(q, k_pool, v_pool, block_tables, seq_lens, window) -> None:  # noqa: ANN001
    name = "paged_attention_decode"
    for label, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a tensor, got {type(t).__name__}")
    if q.dtype != torch.float32:
        raise ValueError(f"{name}: q must be float32, got {q.dtype}")
    if k_pool.dtype not in _POOL_DTYPES or v_pool.dtype != k_pool.dtype:
        raise ValueError(
            f"{name}: k_pool and v_pool must both be float32 or both bfloat16, got {k_pool.dtype} and {v_pool.dtype}"
        )
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be (B, nh, hd), got shape {tuple(q.shape)}")
    if k_pool.dim() != 4:
        raise ValueError(f"{name}: k_pool must be (num_blocks, block_size, nkv, hd), got shape {tuple(k_pool.shape)}")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"{name}: v_pool shape {tuple(v_pool.shape)} != k_pool shape {tuple(k_pool.shape)}")
    B, nh, hd = q.shape
    nkv = k_pool.shape[2]
    if k_pool.shape[3] != hd:
        raise ValueError(f"{name}: head dim of q ({hd}) != head dim of k_pool ({k_pool.shape[3]})")
    if nkv == 0 or nh % nkv:
        raise ValueError(f"{name}: nh ({nh}) must be a multiple of nkv ({nkv})")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(
            f"{name}: block_tables must be (B, max_blocks) = ({B}, *) int32, "
            f"got {block_tables.dtype} of shape {tuple(block_tables.shape)}"
        )
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,):
        raise ValueError(
            f"{name}: seq_lens must be (B,) = ({B},) int32, got {seq_lens.dtype} of shape {tuple(seq_lens.shape)}"
        )
    if window < 0:
        raise ValueError(f"{name}: window must be >= 0, got {window}")


def paged_attention_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """The kernel's function in plain torch: gather each sequence's blocks, mask, SDPA in fp64, fp32 result.
    fp32 or bf16 pools alike (their values widened to fp64 exactly).

    Traceable by torch.compile (no data-dependent Python); table entries a sequence does not read are replaced by
    block 0 before the gather and the rows they bring are zeroed, so garbage there (even NaN) never shows."""
    _check_inputs(q, k_pool, v_pool, block_tables, seq_lens, window)
    B, nh, hd = q.shape
    _, bs, nkv, _ = k_pool.shape
    nb = block_tables.shape[1]
    lens = seq_lens.to(torch.long)[:, None]  # (B, 1)
    checking = not torch.compiler.is_compiling()  # value checks need data-dependent Python: eager only
    if checking and B and bool(((lens < 0) | (lens > nb * bs)).any()):
        raise ValueError(f"paged_attention_decode: seq_lens {seq_lens.tolist()} outside [0, {nb * bs}]")
    pos = torch.arange(nb * bs, device=q.device)[None, :]  # (1, nb*bs)
    start = (lens - window).clamp(min=0) if window > 0 else torch.zeros_like(lens)
    valid = (pos < lens) & (pos >= start)  # (B, nb*bs): the positions each sequence attends to
    used = valid.view(B, nb, bs).any(dim=2)  # (B, nb): the table entries it reads
    if checking:
        bad = used & ((block_tables < 0) | (block_tables >= k_pool.shape[0]))
        if bool(bad.any()):
            b, j = bad.nonzero()[0].tolist()
            raise ValueError(
                f"paged_attention_decode: block_tables[{b}, {j}] = {int(block_tables[b, j])} is not a block of the "
                f"pool (num_blocks {k_pool.shape[0]})"
            )
    if nb * bs == 0 or k_pool.shape[0] == 0:  # nothing to read (every length is 0)
        return q.new_zeros(q.shape)
    tables = torch.where(used, block_tables.to(torch.long), 0)
    keep = valid[:, :, None, None]
    k = torch.where(keep, k_pool[tables].view(B, nb * bs, nkv, hd), 0).to(torch.float64).transpose(1, 2)
    v = torch.where(keep, v_pool[tables].view(B, nb * bs, nkv, hd), 0).to(torch.float64).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.to(torch.float64)[:, :, None, :],  # (B, nh, 1, hd)
        k,
        v,
        attn_mask=valid[:, None, None, :],  # (B, 1, 1, nb*bs)
        scale=scale,
        enable_gqa=True,  # (a plain bool: nh != nkv is symbolic under torch.compile(dynamic=True))
    )[:, :, 0]
    return torch.where(lens[:, :, None] > 0, out, 0).to(torch.float32)  # an empty sequence: zeros, not NaN
