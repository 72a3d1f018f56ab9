"""The static KV cache: allocated once per batch, written in place, never reallocated while decoding."""

from __future__ import annotations

import torch

from rapidlm.config import ModelConfig


class StaticKVCache:
    """K and V for every layer in one tensor (layers, 2, batch, n_kv, max_len, head_dim).

    One allocation per batch keeps decode free of allocator work and gives graph capture stable addresses.
    When sequences finish, `keep(rows)` packs the live rows to the front so later steps compute only them.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.max_len = max_len
        self.data = torch.zeros(
            (cfg.num_layers, 2, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim), dtype=dtype, device=device
        )
        self.batch_size = batch_size
        self._live: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def layers(self, rows: slice | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k, v) views of rows `rows` (default: the live rows), each (B, n_kv, max_len, hd)."""
        if rows is None:
            if self._live is None:  # built once per batch shape, not once per step
                self._live = self.layers(slice(0, self.batch_size))
            return self._live
        return [(layer[0, rows], layer[1, rows]) for layer in self.data]

    def keep(self, rows: list[int]) -> None:
        """Move the listed rows to the front (in this order) and shrink the live batch to them."""
        if rows != list(range(len(rows))):
            index = torch.tensor(rows, device=self.data.device)
            self.data[:, :, : len(rows)] = self.data[:, :, index]
        self.batch_size = len(rows)
        self._live = None
