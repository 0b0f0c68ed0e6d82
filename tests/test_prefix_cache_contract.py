"""One contract, two caches: step 4's mock prefix cache and step 7's block manager both answer
common.prefix.PrefixCache, and the same tests hold for both. Each cache gets a small adapter
that stores a prompt the way its step does, after matching it as its step does: step 4 copies
the prompt's keys and values in; step 7 names the pool blocks that a sequence computed them into
(reusing the blocks it matched), then lets the sequence go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from common.prefix import PrefixCache
from step4_mock_kv.prefix_cache import MockPrefixCache
from step7_real_kv.block_manager import BlockManager

BS = 4  # tokens per block
CAPACITY = 3  # blocks each cache can hold


@dataclass
class Subject:
    cache: PrefixCache[Any]

    def store(self, tokens: list[int]) -> None:
        raise NotImplementedError

    def blocks_of(self, hit) -> list[int]:
        """Which stored blocks a hit's state holds, as the first token id of each."""
        raise NotImplementedError


class Step4(Subject):
    def store(self, tokens: list[int]) -> None:
        hit = self.cache.match(tokens)
        values = torch.tensor(tokens, dtype=torch.float32).view(1, 1, -1, 1)
        self.cache.insert(tokens, [(values, values + 0.5)])  # one layer: K = token ids
        self.cache.release(hit)

    def blocks_of(self, hit) -> list[int]:
        keys = hit.state[0][0].flatten().int().tolist() if hit.state else []
        return keys[::BS]


class Step7(Subject):
    def __init__(self, cache: BlockManager) -> None:
        super().__init__(cache)
        self.first_token: dict[int, int] = {}  # block id -> first token id written to it

    def store(self, tokens: list[int]) -> None:
        blocks: BlockManager = self.cache  # type: ignore[assignment]
        hit = blocks.match(tokens)  # as the scheduler admits a sequence: reuse what is cached
        table = hit.state + blocks.allocate(blocks.blocks_for(len(tokens)) - len(hit.state))
        for i, block_id in enumerate(table):
            self.first_token[block_id] = tokens[i * BS]
        blocks.insert(tokens, table)
        blocks.free(table)  # the sequence ends; its named blocks stay findable

    def blocks_of(self, hit) -> list[int]:
        return [self.first_token[block_id] for block_id in hit.state]


def block_bytes() -> int:
    k = torch.zeros(1, 1, BS, 1)
    return 2 * k.nbytes


@pytest.fixture(params=["step4_mock", "step7_paged"])
def subject(request) -> Subject:
    if request.param == "step4_mock":
        return Step4(MockPrefixCache(BS, CAPACITY * block_bytes()))
    return Step7(BlockManager(num_blocks=CAPACITY, block_size=BS))


def prompt(*blocks: int, extra: int = 0) -> list[int]:
    """Token ids: block b is [b*10, b*10+1, ...]; `extra` tokens of a partial block after."""
    tokens = [b * 10 + i for b in blocks for i in range(BS)]
    return tokens + [99] * extra


def test_a_miss_on_an_empty_cache(subject):
    hit = subject.cache.match(prompt(1, 2))
    assert hit.num_tokens == 0 and hit.keys == []
    assert subject.cache.stats.queried_tokens == 2 * BS and subject.cache.stats.hit_tokens == 0


def test_the_longest_stored_prefix_is_found(subject):
    subject.store(prompt(1, 2, extra=3))  # two full blocks named, the partial one not
    hit = subject.cache.match(prompt(1, 2, 3))
    assert hit.num_tokens == 2 * BS
    assert subject.blocks_of(hit) == [10, 20]
    assert subject.cache.stats.hit_tokens == 2 * BS  # the store's own lookup missed
    subject.cache.release(hit)


def test_a_partial_block_is_never_named(subject):
    subject.store(prompt(1, extra=BS - 1))
    hit = subject.cache.match(prompt(1, extra=BS - 1))
    assert hit.num_tokens == BS
    subject.cache.release(hit)


def test_names_are_chained(subject):
    subject.store(prompt(1, 2))
    assert subject.cache.match(prompt(5, 2)).num_tokens == 0  # same block 2, another history
    shared = subject.cache.match(prompt(1, 7))  # only the first block is shared
    assert shared.num_tokens == BS and subject.blocks_of(shared) == [10]
    subject.cache.release(shared)


def test_pinned_blocks_survive_pressure_and_unpinned_go_least_recent_first(subject):
    subject.store(prompt(1))
    subject.store(prompt(2))
    pinned = subject.cache.match(prompt(1))
    subject.store(prompt(3))  # the cache is now full: 1 (pinned), 2, 3
    subject.store(prompt(4))  # one must go: 1 is pinned, 2 is the least recently used
    assert subject.cache.match(prompt(2)).num_tokens == 0
    for b in (1, 3, 4):
        hit = subject.cache.match(prompt(b))
        assert hit.num_tokens == BS, b
        subject.cache.release(hit)
    subject.cache.release(pinned)
    assert subject.cache.stats.evictions >= 1


def test_storing_the_same_prefix_twice_keeps_one_copy(subject):
    subject.store(prompt(1, 2))
    subject.store(prompt(1, 2))
    subject.store(prompt(3))  # fits: the repeat did not take room
    for blocks in ((1, 2), (3,)):
        hit = subject.cache.match(prompt(*blocks))
        assert hit.num_tokens == len(blocks) * BS
        subject.cache.release(hit)
    assert subject.cache.stats.evictions == 0
