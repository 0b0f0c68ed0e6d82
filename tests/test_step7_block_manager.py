"""Step 7's block manager: allocate, free, reference counts, chained names, LRU eviction, and
the PrefixCache protocol it shares with step 4."""

from __future__ import annotations

import pytest

from common.prefix import PrefixCache, block_hashes
from step7_real_kv.block_manager import BlockManager


def test_allocate_and_free_count_blocks():
    blocks = BlockManager(num_blocks=4, block_size=2)
    got = blocks.allocate(3)
    assert len(set(got)) == 3 and blocks.num_free == 1
    assert [blocks.ref_counts[b] for b in got] == [1, 1, 1]
    blocks.free(got)
    assert blocks.num_free == 4 and set(blocks.ref_counts) == {0}


def test_allocate_exactly_all_then_one_over():
    blocks = BlockManager(num_blocks=3, block_size=2)
    blocks.allocate(3)
    assert blocks.num_free == 0
    with pytest.raises(MemoryError):
        blocks.allocate(1)


def test_double_free_is_caught():
    blocks = BlockManager(num_blocks=2, block_size=2)
    (b,) = blocks.allocate(1)
    blocks.free([b])
    with pytest.raises(RuntimeError):
        blocks.free([b])


def test_blocks_for_rounds_up():
    blocks = BlockManager(num_blocks=2, block_size=4)
    assert [blocks.blocks_for(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_match_finds_inserted_prefix_and_pins_it():
    blocks = BlockManager(num_blocks=8, block_size=2)
    cache: PrefixCache = blocks  # the protocol step 4's cache answers too
    assert all(hasattr(cache, name) for name in ("block_size", "stats", "match", "release"))
    table = blocks.allocate(3)
    blocks.insert([1, 2, 3, 4, 5, 6], table)
    hit = blocks.match([1, 2, 3, 4, 9, 9, 9])
    assert hit.num_tokens == 4 and hit.state == table[:2]
    assert hit.keys == block_hashes([1, 2, 3, 4], 2)
    assert [blocks.ref_counts[b] for b in table] == [2, 2, 1]  # shared by two owners
    blocks.release(hit)
    assert [blocks.ref_counts[b] for b in table] == [1, 1, 1]
    assert blocks.stats.hit_tokens == 4 and blocks.stats.queried_tokens == 7


def test_names_are_chained_a_block_alone_does_not_match():
    blocks = BlockManager(num_blocks=8, block_size=2)
    blocks.insert([1, 2, 3, 4], blocks.allocate(2))
    assert blocks.match([3, 4]).num_tokens == 0  # same tokens, different prefix before them
    assert blocks.match([1, 2, 3, 5]).num_tokens == 2


def test_partial_block_is_never_named():
    blocks = BlockManager(num_blocks=4, block_size=4)
    blocks.insert([1, 2, 3], blocks.allocate(1))
    assert not blocks.by_hash


def test_freed_blocks_stay_findable_until_reused():
    blocks = BlockManager(num_blocks=3, block_size=2)
    table = blocks.allocate(2)
    blocks.insert([1, 2, 3, 4], table)
    blocks.free(table)
    assert blocks.num_free == 3
    hit = blocks.match([1, 2, 3, 4, 5])
    assert hit.state == table and blocks.num_free == 1
    blocks.release(hit)


def test_eviction_takes_least_recently_freed_first_and_drops_its_name():
    blocks = BlockManager(num_blocks=4, block_size=1)
    a, b = blocks.allocate(1), blocks.allocate(1)
    blocks.insert([10], a)
    blocks.insert([20], b)
    blocks.free(a)
    blocks.free(b)
    # free order now: the two never-used blocks, then a, then b
    blocks.allocate(2)
    assert blocks.stats.evictions == 0
    blocks.allocate(1)
    assert blocks.stats.evictions == 1
    assert blocks.match([10]).num_tokens == 0  # a was reused: its name is gone
    assert blocks.match([20]).num_tokens == 1


def test_a_sequence_frees_its_tail_first():
    blocks = BlockManager(num_blocks=3, block_size=1)
    table = blocks.allocate(3)
    blocks.insert([1, 2, 3], table)
    blocks.free(table)
    blocks.allocate(1)  # evicts the last block of the prefix, keeps its start
    assert blocks.match([1, 2, 3]).num_tokens == 2


def test_same_prefix_inserted_twice_keeps_the_first_block():
    blocks = BlockManager(num_blocks=4, block_size=2)
    first, second = blocks.allocate(1), blocks.allocate(1)
    blocks.insert([1, 2], first)
    blocks.insert([1, 2], second)
    assert blocks.match([1, 2, 3]).state == first
