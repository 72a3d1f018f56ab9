"""KVCacheManager: allocation, reference counts, the prefix cache and its eviction order."""

from __future__ import annotations

import pytest

from rapidlm.engine.kv_manager import KVCacheManager, hash_block


def test_grow_and_release_return_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    blocks: list[int] = []
    assert kv.grow(blocks, 9) and len(blocks) == 3  # ceil(9 / 4)
    assert kv.grow(blocks, 12) and len(blocks) == 3  # still fits
    assert kv.grow(blocks, 13) and len(blocks) == 4
    assert kv.num_used == 4 and kv.num_free == 4
    kv.release(blocks)
    assert kv.num_used == 0 and kv.num_free == 8


def test_grow_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a: list[int] = []
    assert kv.grow(a, 12)
    b: list[int] = []
    assert not kv.grow(b, 8)  # needs 2, only 1 free
    assert b == [] and kv.num_free == 1


def test_release_twice_is_an_error():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    blocks: list[int] = []
    kv.grow(blocks, 4)
    kv.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        kv.release(blocks)


def test_hash_chains_prefix():
    a = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == a
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])  # same tokens, other prefix


def test_prefix_cache_shares_full_blocks_and_never_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    blocks: list[int] = []
    kv.grow(blocks, 10)
    hashes: list[bytes] = []
    kv.cache_full_blocks(blocks, hashes, tokens, 10)
    assert len(hashes) == 2

    got, got_hashes = kv.match_prefix(tokens + [7, 8])  # same prompt, longer: both full blocks match
    assert got == blocks[:2] and got_hashes == hashes
    assert kv.ref[blocks[0]] == 2 and kv.stats.hits == 8

    only, _ = kv.match_prefix(tokens[:8])  # 8 tokens = exactly 2 blocks: the last block is recomputed
    assert only == blocks[:1]

    other, _ = kv.match_prefix([1] + tokens[1:])  # first token differs: nothing matches
    assert other == []


def test_cached_blocks_survive_release_and_are_evicted_last():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    blocks: list[int] = []
    kv.grow(blocks, 5)  # 3 blocks
    hashes: list[bytes] = []
    kv.cache_full_blocks(blocks, hashes, tokens, 5)  # blocks 0, 1 full and cached; block 2 partial
    kv.release(blocks)
    assert kv.num_used == 0
    # A new sequence takes one block: the uncached one goes first, the cached ones stay findable.
    fresh: list[int] = []
    kv.grow(fresh, 2)
    assert fresh[0] not in blocks[:2]
    hit, _ = kv.match_prefix(tokens)
    assert hit == blocks[:2]
    kv.release(hit)
    # Exhausting the free list evicts cached blocks (LRU), after which they no longer match.
    rest: list[int] = []
    assert kv.grow(rest, 6)
    assert kv.match_prefix(tokens)[0] == []


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    blocks: list[int] = []
    kv.grow(blocks, 4)
    hashes: list[bytes] = []
    kv.cache_full_blocks(blocks, hashes, [1, 2, 3, 4], 4)
    assert hashes == [] and kv.match_prefix([1, 2, 3, 4, 5]) == ([], [])
