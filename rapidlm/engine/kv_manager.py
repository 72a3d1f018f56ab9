"""KV-cache manager: which physical blocks each sequence owns, and the prefix cache. Pure Python, no tensors.

Blocks are reference-counted. A full block whose tokens are known gets a content hash that chains its
prefix: hash(block i) = sha256(hash(block i-1) || tokens of block i), so equal hashes mean equal tokens at
equal positions, i.e. equal keys/values. A later sequence whose prompt starts with the same tokens takes those
blocks (ref + 1) instead of computing them again. A block whose count drops to 0 stays in the hash map and
joins the free queue at the back (least recently used first out); a block with no hash goes to the front, so
it is reused before any cached block is evicted.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes


def hash_block(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    h = hashlib.sha256(parent or b"")
    h.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in tokens))
    return h.digest()


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens served from cached blocks


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # ref == 0; cached blocks sit behind uncached ones
        self.stats = PrefixCacheStats()

    # ---- queries ------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache --------------------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[BlockHash]]:
        """Take the longest run of cached full blocks that `token_ids` starts with; (block ids, their hashes).

        At most (len - 1) // bs blocks match: the block holding the last token is always computed (and owned)
        by the caller, so a shared block is never written to and the last position yields fresh logits.
        """
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        blocks: list[int] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        for i in range((len(token_ids) - 1) // bs):
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        for block in blocks:
            self._take(block)
        self.stats.queries += len(token_ids)
        self.stats.hits += len(blocks) * bs
        return blocks, hashes

    def cache_full_blocks(
        self, blocks: Sequence[int], hashes: list[BlockHash], token_ids: Sequence[int], num_computed: int
    ) -> None:
        """Register every block that is now full of computed tokens; `hashes` (the sequence's chain) grows."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(hashes), num_computed // bs):
            h = hash_block(hashes[-1] if hashes else None, token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = blocks[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h

    # ---- allocation ----------------------------------------------------------------------------------------

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extend `blocks` in place to cover `num_tokens` tokens; False (and no change) if too few are free."""
        need = self.blocks_needed(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            block = self.free.popleft()
            h = self.block_hash[block]
            if h is not None:  # evict: its contents are about to be overwritten
                del self.cached[h]
                self.block_hash[block] = None
            self.ref[block] = 1
            blocks.append(block)
        return True

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks nobody holds become free (cached ones stay findable)."""
        for block in reversed(blocks):  # tail blocks first: they are the least likely to be shared again
            self.ref[block] -= 1
            if self.ref[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.ref[block] == 0:
                if self.block_hash[block] is None:
                    self.free.appendleft(block)
                else:
                    self.free.append(block)

    def _take(self, block: int) -> None:
        if self.ref[block] == 0:
            self.free.remove(block)  # O(free) but only on a prefix hit of a block nobody holds
        self.ref[block] += 1
