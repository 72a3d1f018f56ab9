"""The static KV cache: allocated once per batch, written in place, never reallocated while decoding.

The model sees one `LayerKV` per layer with a single method, `attend(q, k, v, write_at, mask, kv_len)`; dense
caches implement it (rapidlm.runtime.attention) as `update(k, v, b_idx, pos, kv_len)`, which writes this step's
keys/values at each sequence's positions and returns the keys/values to attend over, followed by SDPA. How they are
stored (the model dtype, fp32, or int8 with scales) is the cache's business, not the model's.
"""

from __future__ import annotations

import torch

from rapidlm.compress.primitives import quantize_per_token_int8
from rapidlm.config import ModelConfig
from rapidlm.runtime.attention import CacheAttention
from rapidlm.runtime.paged_kv import DecodeKernel, decode_kernel_for


class _StepIndex:
    """Block tables and lengths for the decode kernel, built once per forward and shared by every layer (the same
    `pos` tensor reaches each layer's attend): ~4 small ops, not ~4 per layer."""

    def __init__(self) -> None:
        self.pos: torch.Tensor | None = None
        self.tables = self.lens = torch.empty(0)

    def get(self, pos: torch.Tensor, nkv: int) -> tuple[torch.Tensor, torch.Tensor]:  # pos (B, 1)
        if pos is not self.pos or torch.compiler.is_compiling():
            B = pos.shape[0]
            self.tables = torch.arange(B * nkv, dtype=torch.int32, device=pos.device)[:, None]  # (B*nkv, 1)
            self.lens = (pos + 1).to(torch.int32).expand(B, nkv).reshape(B * nkv)  # each row's kv heads
            self.pos = None if torch.compiler.is_compiling() else pos
        return self.tables, self.lens


class LayerKV(CacheAttention):
    """One layer's k and v views, each (B, n_kv, max_len, hd), stored in `dtype`.

    With `kernel` (the CPU paged-attention decode kernel), one-token steps attend through it instead of SDPA: every
    (row, kv head) is a "block" of max_len rows of one head, read up to the row's own length. SDPA's result for a
    row depends on the padded length and the other rows of the batch (measured: ~1e-7 apart), which can flip a
    near-tie between a prompt decoded in a batch and alone; the kernel computes each row on its own."""

    def __init__(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        kernel: DecodeKernel | None = None,
        window: int = 0,
        step: _StepIndex | None = None,
    ) -> None:
        self.k, self.v = k, v
        self.dtype = k.dtype  # the attention dtype: q/k/v are widened to it before RoPE
        self.kernel, self.window = kernel, window
        self.step = step or _StepIndex()

    def attend(self, q, k, v, write_at, mask, kv_len):  # noqa: ANN001, ANN201 - see CacheAttention.attend
        B, T, nh, hd = q.shape
        if self.kernel is None or T != 1 or not self.k.is_contiguous():
            return super().attend(q, k, v, write_at, mask, kv_len)
        b_idx, pos = write_at  # (B, 1) each
        self.k[b_idx, :, pos] = k
        self.v[b_idx, :, pos] = v.to(self.dtype)
        _, nkv, max_len, _ = self.k.shape
        pool_k = self.k.view(B * nkv, max_len, 1, hd)  # (row, kv head) -> one block of max_len positions
        pool_v = self.v.view(B * nkv, max_len, 1, hd)
        tables, lens = self.step.get(pos, nkv)
        out = self.kernel(q.reshape(B * nkv, nh // nkv, hd), pool_k, pool_v, tables, lens, hd**-0.5, self.window)
        return out.view(B, nh, 1, hd)  # (B, nh, T, hd)

    def update(
        self,
        k: torch.Tensor,  # (B, T, nkv, hd)
        v: torch.Tensor,
        b_idx: torch.Tensor,  # (B, T) batch row of each new entry
        pos: torch.Tensor,  # (B, T) its position
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values (B, nkv, kv_len, hd)
        self.k[b_idx, :, pos] = k  # indexed view is (B, T, nkv, hd)
        self.v[b_idx, :, pos] = v.to(self.dtype)
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


class NoCacheKV(CacheAttention):
    """No cache at all: a whole sequence (positions 0..T-1) attends within itself, as in training. Nothing is
    stored, so autograd sees plain tensors; `dtype` is the attention dtype (the model's parameter dtype)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def update(self, k, v, b_idx, pos, kv_len):  # noqa: ANN001, ANN201 - same contract as LayerKV.update
        if k.shape[1] != kv_len:
            raise ValueError(f"NoCacheKV attends within one call: got {k.shape[1]} new tokens for kv_len {kv_len}")
        return k.transpose(1, 2), v.to(k.dtype).transpose(1, 2)  # (B, nkv, T, hd)


class Int8LayerKV(CacheAttention):
    """One layer's k and v as int8 codes (B, n_kv, max_len, hd) with one fp32 scale per (token, kv head).

    Attention reads them back dequantized to `dtype`, so every score (prefill included) sees the stored
    int8 values: the quality measured is the quality served.
    """

    def __init__(self, kq: torch.Tensor, vq: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, dtype: torch.dtype):
        self.kq, self.vq, self.ks, self.vs = kq, vq, ks, vs
        self.dtype = dtype

    def update(self, k, v, b_idx, pos, kv_len):  # noqa: ANN001, ANN201 - same contract as LayerKV.update
        qk, sk = quantize_per_token_int8(k)  # per (b, t, head): scale over hd
        qv, sv = quantize_per_token_int8(v)
        self.kq[b_idx, :, pos] = qk
        self.ks[b_idx, :, pos] = sk
        self.vq[b_idx, :, pos] = qv
        self.vs[b_idx, :, pos] = sv
        keys = self.kq[:, :, :kv_len].to(self.dtype) * self.ks[:, :, :kv_len].to(self.dtype)
        values = self.vq[:, :, :kv_len].to(self.dtype) * self.vs[:, :, :kv_len].to(self.dtype)
        return keys, values


class StaticKVCache:
    """K and V for every layer in one tensor (layers, 2, batch, n_kv, max_len, head_dim).

    One allocation per batch keeps decode free of allocator work and gives graph capture stable addresses.
    When sequences finish, `keep(rows)` packs the live rows to the front so later steps compute only them.
    int8=True stores int8 codes plus a (layers, 2, batch, n_kv, max_len, 1) fp32 scale tensor instead.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        int8: bool = False,
    ):
        self.max_len = max_len
        self.dtype = dtype
        self.int8 = int8
        shape = (cfg.num_layers, 2, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.data = torch.zeros(shape, dtype=torch.int8 if int8 else dtype, device=device)
        self.scales = torch.zeros((*shape[:-1], 1), dtype=torch.float32, device=device) if int8 else None
        self.batch_size = batch_size
        self._live: list | None = None
        self.window = cfg.sliding_window or 0
        # the fused decode kernel where it serves this cache (CPU, fp32 or bf16 storage): see LayerKV. CUDA decode
        # runs CUDA graphs or SDPA; its Triton kernel serves the paged cache.
        on_cpu = torch.device(device).type == "cpu"
        self.kernel = decode_kernel_for(torch.device(device), dtype, dtype) if on_cpu and not int8 else None

    @property
    def nbytes(self) -> int:
        extra = self.scales.numel() * self.scales.element_size() if self.scales is not None else 0
        return self.data.numel() * self.data.element_size() + extra

    def layers(self, rows: slice | None = None) -> list[LayerKV] | list[Int8LayerKV]:
        """Per-layer caches over rows `rows` (default: the live rows), each view (B, n_kv, max_len, hd)."""
        if rows is None:
            if self._live is None:  # built once per batch shape, not once per step
                self._live = self.layers(slice(0, self.batch_size))
            return self._live
        if self.scales is None:
            step = _StepIndex()
            return [LayerKV(layer[0, rows], layer[1, rows], self.kernel, self.window, step) for layer in self.data]
        return [
            Int8LayerKV(q[0, rows], q[1, rows], s[0, rows], s[1, rows], self.dtype)
            for q, s in zip(self.data, self.scales)
        ]

    def keep(self, rows: list[int]) -> None:
        """Move the listed rows to the front (in this order) and shrink the live batch to them."""
        if rows != list(range(len(rows))):
            index = torch.tensor(rows, device=self.data.device)
            self.data[:, :, : len(rows)] = self.data[:, :, index]
            if self.scales is not None:
                self.scales[:, :, : len(rows)] = self.scales[:, :, index]
        self.batch_size = len(rows)
        self._live = None
