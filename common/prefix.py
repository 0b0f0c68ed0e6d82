"""Naming prompt prefixes: token blocks, chained block hashes, and the prefix-cache protocol.

A prompt is cut into fixed-size blocks of token ids. Each full block is named by a hash of its
tokens and of the previous block's name, so a name identifies the whole prefix up to and
including that block: two prompts share a block name only if they share everything before it.
This is how automatic prefix caching names blocks; the step-4 mock cache and the step-7 paged
cache both build on it and answer the same `PrefixCache` protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

State = TypeVar("State")


def block_hashes(token_ids: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """One chained hash per *full* block of `token_ids` (a trailing partial block has none).
    `parent` is the name of the block before `token_ids[0]`, to continue a chain."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.sha256(parent)
        digest.update(b",".join(str(t).encode() for t in block))
        parent = digest.digest()
        hashes.append(parent)
    return hashes


@dataclass
class CacheStats:
    """Counted in tokens: hit rate = hit_tokens / queried_tokens; evictions in blocks."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class PrefixHit(Generic[State]):
    """The longest cached prefix of a prompt, pinned until released."""

    num_tokens: int  # a multiple of the block size; 0 on a miss
    state: State  # what the cache holds for those tokens (step 4: K/V tensors, step 7: block ids)
    keys: list[bytes] = field(default_factory=list)  # the names of the matched blocks


class PrefixCache(Protocol[State]):
    """What steps 4 and 7 both implement: find, pin and unpin, and offer computed prefixes."""

    block_size: int
    stats: CacheStats

    def match(self, token_ids: list[int]) -> PrefixHit[State]:
        """The longest run of cached full blocks at the start of `token_ids`, pinned (every
        matched block's reference count +1, so it cannot be evicted while in use)."""
        ...

    def release(self, hit: PrefixHit[State]) -> None:
        """Unpin what `match` pinned; unpinned blocks may be evicted, least recently used
        first."""
        ...

    def insert(self, token_ids: list[int], state: State) -> None:
        """Offer the full blocks of `token_ids`, computed as `state`; names already cached keep
        their block."""
        ...
