"""Naming prompt prefixes: token blocks, chained block hashes, and the prefix-cache protocol.

A prompt is cut into fixed-size blocks of token ids. Each full block is named by a hash of its
tokens and of the previous block's name, so a name identifies the whole prefix up to and
including that block: two prompts share a block name only if they share everything before it.
This is how automatic prefix caching names blocks; the step-4 mock cache and the step-7 paged
cache both build on it and answer the same `PrefixCache` protocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """One chained hash per *full* block of `token_ids` (a trailing partial block has none)."""
    hashes, parent = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.sha256(parent)
        digest.update(b",".join(str(t).encode() for t in block))
        parent = digest.digest()
        hashes.append(parent)
    return hashes


@dataclass
class CacheStats:
    """Counted in tokens: hit rate = hit_tokens / queried_tokens."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class PrefixHit:
    """The longest cached prefix of a prompt, pinned until released."""

    num_tokens: int  # a multiple of the block size; 0 on a miss
    state: Any = None  # what the cache stores for that prefix (KV tensors, block ids, ...)
    keys: list[bytes] = field(default_factory=list)  # the block hashes that matched


class PrefixCache(Protocol):
    block_size: int
    stats: CacheStats

    def match(self, token_ids: Sequence[int]) -> PrefixHit:
        """Find the longest cached full-block prefix and pin it (reference count +1)."""

    def release(self, hit: PrefixHit) -> None:
        """Unpin what `match` pinned; unpinned entries may be evicted."""

    def insert(self, token_ids: Sequence[int], state: Any) -> None:
        """Offer the state of a computed prefix; the cache keeps what fits its budget."""
