"""A mock KV cache: reuse the keys and values of a prompt prefix that was computed before.

Every transformer layer turns each prompt token into a key and a value; a prompt that starts
with the same tokens as an earlier one produces the same keys and values for that start. Keep
them, and the next prompt only has to prefill its new suffix.

The bookkeeping here is the real thing, the same protocol step 7's paged cache implements
(common.prefix.PrefixCache): prompts are named block by block with chained hashes, a new prompt
finds the longest chain that is cached, entries in use are pinned by a reference count, and
unpinned entries are evicted least-recently-used first when the byte budget is exceeded. What is
"mock" is the storage: each entry is an ordinary per-prefix copy of the tensors (one per layer),
not blocks in a shared preallocated pool, so two prompts that share a prefix store it twice.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.prefix import CacheStats, PrefixHit, block_hashes

# Per layer: (keys, values), each [1, kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Entry:
    entry_id: int
    hashes: list[bytes]  # one per full block this entry holds
    kv: list[LayerKV]
    nbytes: int
    refs: int = 0


class MockPrefixCache:
    def __init__(self, block_size: int, budget_bytes: int) -> None:
        self.block_size = block_size
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self.used_bytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order: oldest first
        self._by_hash: dict[bytes, set[int]] = {}  # block hash -> entries holding that prefix
        self._ids = itertools.count()

    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        # At least one prompt token must be left to prefill: its logits give the first token.
        usable = block_hashes(token_ids[: len(token_ids) - 1], self.block_size)
        self.stats.queried_tokens += len(token_ids)
        for n_blocks in range(len(usable), 0, -1):
            holders = self._by_hash.get(usable[n_blocks - 1])
            if holders:
                entry = self._entries[next(iter(holders))]
                return self._pin(entry, n_blocks, usable[:n_blocks])
        return PrefixHit(0)

    def _pin(self, entry: _Entry, n_blocks: int, keys: list[bytes]) -> PrefixHit:
        entry.refs += 1
        self._entries.move_to_end(entry.entry_id)
        n_tokens = n_blocks * self.block_size
        self.stats.hit_tokens += n_tokens
        state = [(k[:, :, :n_tokens], v[:, :, :n_tokens]) for k, v in entry.kv]
        return PrefixHit(n_tokens, (entry.entry_id, state), keys)

    def release(self, hit: PrefixHit) -> None:
        if hit.num_tokens:
            entry = self._entries.get(hit.state[0])
            if entry is not None:
                entry.refs -= 1
            self._evict_over_budget()

    def insert(self, token_ids: Sequence[int], state: list[LayerKV]) -> None:
        """Keep the full-block prefix of `token_ids` whose per-layer KV is `state`."""
        hashes = block_hashes(token_ids, self.block_size)
        if not hashes or hashes[-1] in self._by_hash:
            return  # nothing to name, or this whole prefix is already held
        n_tokens = len(hashes) * self.block_size
        kv = [(k[:, :, :n_tokens].clone(), v[:, :, :n_tokens].clone()) for k, v in state]
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        if nbytes > self.budget_bytes:
            return
        entry = _Entry(next(self._ids), hashes, kv, nbytes)
        self._entries[entry.entry_id] = entry
        for h in hashes:
            self._by_hash.setdefault(h, set()).add(entry.entry_id)
        self.used_bytes += nbytes
        self._evict_over_budget()

    def _evict_over_budget(self) -> None:
        for entry in list(self._entries.values()):  # oldest first
            if self.used_bytes <= self.budget_bytes:
                return
            if entry.refs == 0:
                self._remove(entry)

    def _remove(self, entry: _Entry) -> None:
        del self._entries[entry.entry_id]
        for h in entry.hashes:
            holders = self._by_hash[h]
            holders.discard(entry.entry_id)
            if not holders:
                del self._by_hash[h]
        self.used_bytes -= entry.nbytes
        self.stats.evictions += 1
