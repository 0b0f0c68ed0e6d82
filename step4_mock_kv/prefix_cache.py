"""A mock KV cache: reuse the keys and values of a prompt prefix that was computed before.

Every transformer layer turns each prompt token into a key and a value; a prompt that starts
with the same tokens as an earlier one produces the same keys and values for that start. Keep
them, and the next prompt only has to prefill its new suffix.

The bookkeeping here is the real thing, the same protocol step 7's paged cache implements
(common.prefix.PrefixCache): prompts are cut into blocks named by chained hashes, a new prompt
finds the longest run of named blocks it starts with, blocks in use are pinned by a reference
count, and unpinned blocks are evicted least-recently-used first when the byte budget is
exceeded. What is "mock" is the storage: each block is its own small tensors in a dictionary, so
a hit copies the prefix out into transformers' contiguous cache (and `insert` copies it in),
where step 7 keeps one preallocated pool that attention reads in place.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from common.config import ConfigPart, knob
from common.prefix import CacheStats, PrefixHit, block_hashes


@dataclass(frozen=True)
class PrefixCacheConfig(ConfigPart):
    block_size: int = knob(16, "tokens per prefix block")
    prefix_cache_mb: int = knob(512, "byte budget of the prefix cache, in MiB")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1 or self.prefix_cache_mb < 0:
            raise ValueError("block_size must be >= 1 and prefix_cache_mb >= 0")


# Per layer: (keys, values), each [1, kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Block:
    kv: list[LayerKV]  # per layer, [1, kv_heads, block_size, head_dim] each
    nbytes: int
    refs: int = 0


class MockPrefixCache:
    """PrefixCache[list[LayerKV]]: a hit's state is the prefix's keys and values, per layer."""

    def __init__(self, block_size: int, budget_bytes: int) -> None:
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self.used_bytes = 0
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # by name, oldest use first

    def match(self, token_ids: list[int]) -> PrefixHit[list[LayerKV]]:
        keys = []
        for key in block_hashes(token_ids, self.block_size):
            if key not in self._blocks:
                break
            keys.append(key)
        for key in keys:
            self._blocks[key].refs += 1
        self._touch(keys)
        num_tokens = len(keys) * self.block_size
        self.stats.queried_tokens += len(token_ids)
        self.stats.hit_tokens += num_tokens
        return PrefixHit(num_tokens, self._concat(keys), keys)

    def release(self, hit: PrefixHit[list[LayerKV]]) -> None:
        for key in hit.keys:
            self._blocks[key].refs -= 1  # pinned blocks are never evicted, so still here
        self._evict_over_budget()

    def insert(self, token_ids: list[int], state: list[LayerKV]) -> None:
        """Keep each full block of `token_ids`, cut out of `state` (per layer, [1, kv_heads,
        >= len(token_ids), head_dim]), unless a block of that name is already kept."""
        keys = block_hashes(token_ids, self.block_size)
        for i, key in enumerate(keys):
            if key not in self._blocks:
                self._add(key, state, slice(i * self.block_size, (i + 1) * self.block_size))
        self._touch(keys)
        self._evict_over_budget()

    def _add(self, key: bytes, state: list[LayerKV], span: slice) -> None:
        kv = [(k[:, :, span].clone(), v[:, :, span].clone()) for k, v in state]
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        if nbytes <= self.budget_bytes:  # a block bigger than the whole budget is not kept
            self._blocks[key] = _Block(kv, nbytes)
            self.used_bytes += nbytes

    def _touch(self, keys: list[bytes]) -> None:
        """Mark as just used, the first block last: under pressure a prefix loses its tail
        first, and its head (shared by more prompts) stays findable longest."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _concat(self, keys: list[bytes]) -> list[LayerKV]:
        """The matched blocks joined per layer: [1, kv_heads, len(keys) * block_size, dim]."""
        if not keys:
            return []
        blocks = [self._blocks[key].kv for key in keys]
        layers = range(len(blocks[0]))
        return [
            (
                torch.cat([b[layer][0] for b in blocks], dim=2),
                torch.cat([b[layer][1] for b in blocks], dim=2),
            )
            for layer in layers
        ]

    def _evict_over_budget(self) -> None:
        for key in list(self._blocks):  # least recently used first
            if self.used_bytes <= self.budget_bytes:
                return
            block = self._blocks[key]
            if block.refs == 0:
                del self._blocks[key]
                self.used_bytes -= block.nbytes
                self.stats.evictions += 1
