"""Attention as the KV cache serves it.

The model hands each layer's cache this step's q, k and v; the cache stores k/v its own way and computes
attention over what it holds. The default is "write, read back, SDPA", which every dense cache uses; a paged
cache overrides `attend` to run a kernel that reads its blocks in place instead of gathering them first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CacheAttention:
    """Mixin: `attend` = `update` (store and return keys/values) + scaled-dot-product attention."""

    def update(self, k, v, b_idx, pos, kv_len):  # noqa: ANN001, ANN201 - implemented by each cache
        raise NotImplementedError

    def attend(
        self,
        q: torch.Tensor,  # (B, T, nh, hd) rotated queries in the attention dtype
        k: torch.Tensor,  # (B, T, nkv, hd) rotated keys
        v: torch.Tensor,  # (B, T, nkv, hd)
        write_at: tuple[torch.Tensor, torch.Tensor],  # batch index (B, T), position (B, T)
        mask: torch.Tensor | None,  # (B, 1, T, L) bool, True = may attend; None = all of [0, kv_len)
        kv_len: int,
    ) -> torch.Tensor:  # (B, nh, T, hd)
        keys, values = self.update(k, v, write_at[0], write_at[1], kv_len)  # each (B, nkv, kv_len, hd)
        return F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, nh, T, hd)
            keys,
            values,
            attn_mask=mask,
            enable_gqa=q.shape[2] != k.shape[2],
        )
