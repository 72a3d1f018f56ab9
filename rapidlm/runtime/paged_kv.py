"""The paged KV cache: one pool of fixed-size blocks per layer, shared by every running sequence.

A sequence owns a list of block ids (its block table); logical position p lives in block table[p // bs] at
offset p % bs. Blocks are handed out and taken back by rapidlm.engine.kv_manager, which knows nothing of
tensors; this module only stores and reads. The model sees one `PagedLayerKV` per layer through the same
`attend` contract as the dense caches (rapidlm.runtime.attention), so models/ never learns about pages.

The pool's storage dtype may be narrower than the attention dtype (bf16 storage under fp32 attention on the CPU:
half the bytes for the decode kernel to read, and half the memory per block). Keys and values are rounded to the
storage dtype as they are written; the decode kernel widens them in registers, and the gather path (prefill)
widens what it gathers back to the attention dtype before SDPA. The model only ever sees the attention dtype.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch

from rapidlm.config import ModelConfig
from rapidlm.runtime.attention import CacheAttention

DecodeKernel = Callable[..., torch.Tensor]  # (q (B,nh,hd), k_pool, v_pool, tables, seq_lens, scale, window)


def decode_kernel_for(device: torch.device, dtype: torch.dtype, storage_dtype: torch.dtype) -> DecodeKernel | None:
    """The fused paged-attention decode kernel for this device and these dtypes, or None to gather blocks and run
    SDPA. The CPU kernel takes fp32 queries and fp32 or bf16 pools."""
    try:
        if device.type == "cpu":
            if dtype != torch.float32 or storage_dtype not in (torch.float32, torch.bfloat16):
                return None
            from rapidlm.runtime.kernels.paged_attention import decode_kernel_available, paged_attention_decode
        elif device.type == "cuda":
            from rapidlm.runtime.kernels.paged_attention_triton import (
                decode_kernel_available,
                paged_attention_decode,
            )
        else:
            return None
    except ImportError:
        return None
    return paged_attention_decode if decode_kernel_available() else None


_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE_PAGE = 2 << 20


def _zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros on the CPU, its memory advised as transparent huge pages before it is first touched (Linux;
    elsewhere, or where the advice is refused, plain pages). A decode step's attention reads blocks scattered over
    the whole pool (tens of MB per step at 16 sequences); with 4 KiB pages nearly every block read is a TLB miss.
    Measured on SmolLM2-135M, 16 sequences at 200 tokens, 2 threads, interleaved: a decode step 34.0 -> 32.9 ms."""
    t = torch.empty(shape, dtype=dtype)
    if sys.platform.startswith("linux") and t.numel() * t.element_size() >= 2 * _HUGE_PAGE:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
            end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass  # no madvise here: plain pages
    return t.zero_()


class PagedLayerKV(CacheAttention):
    """One layer's view of the pool for one forward: where this step writes, and which blocks each row reads."""

    def __init__(
        self,
        k_pool: torch.Tensor,  # (num_blocks, bs, nkv, hd) in the storage dtype
        v_pool: torch.Tensor,
        slots: torch.Tensor,  # (B*T,) flat slot (block * bs + offset) of each new token
        tables: torch.Tensor,  # (B, nb) int64 block ids covering [0, kv_len) of every row
        seq_lens: torch.Tensor | None,  # (B,) int32, tokens each row attends to (decode kernel only)
        kernel: DecodeKernel | None,
        window: int,
        dtype: torch.dtype | None = None,  # the attention dtype (None: the pool's)
    ) -> None:
        self.k_pool, self.v_pool = k_pool, v_pool
        self.slots, self.tables, self.seq_lens = slots, tables, seq_lens
        self.kernel, self.window = kernel, window
        self.dtype = dtype or k_pool.dtype  # what the model casts q and k to before RoPE, and attention runs in

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:  # rounded to the storage dtype
        nkv, hd = k.shape[-2:]
        self.k_pool.view(-1, nkv, hd)[self.slots] = k.reshape(-1, nkv, hd).to(self.k_pool.dtype)
        self.v_pool.view(-1, nkv, hd)[self.slots] = v.reshape(-1, nkv, hd).to(self.v_pool.dtype)

    def update(self, k, v, b_idx, pos, kv_len):  # noqa: ANN001, ANN201 - the dense contract, by gathering blocks
        self._write(k, v)
        B, nb = self.tables.shape
        _, bs, nkv, hd = self.k_pool.shape
        # (B, nb, bs, nkv, hd) -> (B, nb*bs, nkv, hd) is a free view; the gather itself is the one copy.
        keys = self.k_pool[self.tables].view(B, nb * bs, nkv, hd)[:, :kv_len].to(self.dtype).transpose(1, 2)
        values = self.v_pool[self.tables].view(B, nb * bs, nkv, hd)[:, :kv_len].to(self.dtype).transpose(1, 2)
        return keys, values  # (B, nkv, kv_len, hd); slots past a row's length are masked by the model

    def attend(self, q, k, v, write_at, mask, kv_len):  # noqa: ANN001, ANN201 - see CacheAttention.attend
        if self.kernel is None or self.seq_lens is None:
            return super().attend(q, k, v, write_at, mask, kv_len)
        # The kernel reads each row's blocks in place: no gather, no mask. Decode: one query per row. Prefill: every
        # query token is a row of its own (its sequence's table, length = its position + 1), so causality is the
        # row length; all of this step's keys are written before any row reads.
        self._write(k, v)
        B, T, nh, hd = q.shape
        out = self.kernel(
            q.reshape(B * T, nh, hd), self.k_pool, self.v_pool, self.tables, self.seq_lens, hd**-0.5, self.window
        )  # (B*T, nh, hd)
        return out.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)


class PagedKVCache:
    """K and V pools for every layer in one tensor (layers, 2, num_blocks, block_size, n_kv, head_dim).

    `dtype` is the attention dtype (what the model computes q, k and attention in); `storage_dtype` (None: the
    same) is what the pools hold."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        use_kernel: bool = True,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"PagedKVCache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device, self.dtype = device, dtype
        self.storage_dtype = storage_dtype or dtype
        shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        if device.type == "cpu":
            self.data = _zeros_on_huge_pages(shape, self.storage_dtype)
        else:
            self.data = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        self.window = cfg.sliding_window or 0
        self.kernel = decode_kernel_for(device, dtype, self.storage_dtype) if use_kernel else None
        # Prefill through the decode kernel too (a row per query token): on the CPU it is ~5x faster than gathering
        # the blocks and running SDPA with a mask at prompt-chunk sizes (e.g. 150 tokens: ~5 vs ~25 ms a forward
        # on SmolLM2-135M). Not on CUDA, where the decode kernel's one-program-per-row grid is not meant for it.
        self.kernel_prefill = device.type == "cpu"

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layers(
        self,
        block_tables: list[list[int]],  # per row, the block ids covering every position it reads or writes
        positions: torch.Tensor,  # (B, T) on the device: where this step's tokens go
        seq_lens: list[int],  # per row, tokens it attends to after this step (= last position + 1)
    ) -> list[PagedLayerKV]:
        B, T = positions.shape
        if T > 1 and self.flat_ok:  # prompt chunks: one kernel row per query token (see layers_flat)
            return self.layers_flat(block_tables, [T] * B, positions.reshape(-1))
        nb = max(len(t) for t in block_tables)
        padded = [t + [0] * (nb - len(t)) for t in block_tables]  # block 0 is masked out / never read
        tables = torch.tensor(padded, dtype=torch.long, device=self.device)  # (B, nb)
        bs = self.block_size
        rows = torch.arange(B, device=self.device)[:, None]
        slots = (tables[rows, positions // bs] * bs + positions % bs).reshape(-1)  # (B*T,)
        lens = None
        if self.kernel is not None and T == 1:
            lens = torch.tensor(seq_lens, dtype=torch.int32, device=self.device)
            tables = tables.to(torch.int32)
        return [PagedLayerKV(k, v, slots, tables, lens, self.kernel, self.window, self.dtype) for k, v in self.data]

    @property
    def flat_ok(self) -> bool:
        """layers_flat works: the kernel runs every query token as a row of its own (the CPU)."""
        return self.kernel is not None and self.kernel_prefill

    def layers_flat(
        self,
        block_tables: list[list[int]],  # per segment, the block ids covering every position it reads or writes
        counts: list[int],  # per segment, its tokens in this step
        positions: torch.Tensor,  # (N,) on the device, N = sum(counts): every token's position, segment by segment
    ) -> list[PagedLayerKV]:
        """The views for one forward over several sequences' tokens laid end to end as one row of N tokens
        (decode tokens and prompt chunks alike): each query token is a kernel row with its own sequence's table
        and its own position + 1 as its length, as in prefill through the kernel (needs flat_ok)."""
        nb = max(len(t) for t in block_tables)
        padded = [t + [0] * (nb - len(t)) for t in block_tables]
        counts_t = torch.tensor(counts, device=self.device)
        tables = torch.tensor(padded, dtype=torch.long, device=self.device)
        tables = tables.repeat_interleave(counts_t, dim=0)  # (N, nb): each token's sequence's table
        bs = self.block_size
        rows = torch.arange(len(positions), device=self.device)
        slots = tables[rows, positions // bs] * bs + positions % bs  # (N,)
        lens = (positions + 1).to(torch.int32)
        tables = tables.to(torch.int32)
        return [PagedLayerKV(k, v, slots, tables, lens, self.kernel, self.window, self.dtype) for k, v in self.data]
