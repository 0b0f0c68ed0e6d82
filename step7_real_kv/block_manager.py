"""The block manager: who owns which KV block, and which full blocks can be found again by name.

The KV pool (paged_kv.py) is cut into `num_blocks` blocks of `block_size` token slots. This class
only does the bookkeeping, with block ids: a reference count per block (a block shared by two
sequences through a common prefix has count 2), a free list, and a map from a full block's
chained hash (common.prefix.block_hashes) to the block that holds it.

A block whose count drops to 0 goes to the back of the free list but keeps its hash, so a later
prompt with the same prefix still finds it ("freed but findable"). Allocation takes from the
front, so the least recently freed block is the one reused (LRU); only then is its hash dropped.

It is the one record of a block's name: `block_hash[b]` is the name of the tokens block b holds
(once full and computed), and `by_hash` finds the first block that got each name. Two sequences
that computed the same prefix each hold a block of that name; the second is not findable, but
it keeps its name, so its sequence's chain of names goes on from it (`name_of`).

It answers the same PrefixCache protocol as the step-4 cache: `match` pins the longest cached
prefix (the hit's state is the list of block ids), `release` unpins, `insert` names blocks.
"""

from __future__ import annotations

from collections import OrderedDict

from common.prefix import CacheStats, PrefixHit, block_hashes


class BlockManager:
    """PrefixCache[list[int]]: a hit's state is the ids of the blocks holding the prefix."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.stats = CacheStats()
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        # Free block ids, least recently freed first; an OrderedDict gives O(1) removal when a
        # freed-but-cached block is found again by `match`.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold `num_tokens` token slots."""
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ owning blocks

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with reference count 1. Raises if fewer than n are free."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_free} free")
        return [self._take(self.free_ids.popitem(last=False)[0]) for _ in range(n)]

    def _take(self, block_id: int) -> int:
        old = self.block_hash[block_id]
        if old is not None:
            self.block_hash[block_id] = None
            if self.by_hash.get(old) == block_id:  # reusing a findable block evicts its prefix
                del self.by_hash[old]
                self.stats.evictions += 1
        self.ref_counts[block_id] = 1
        return block_id

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. The tail goes back first, so under pressure the
        longest (least shareable) suffix of a prefix is evicted before its first blocks."""
        for block_id in reversed(block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_ids[block_id] = None
            elif self.ref_counts[block_id] < 0:
                raise RuntimeError(f"KV block {block_id} freed twice")

    def share(self, block_ids: list[int]) -> None:
        """One more reference to each block (a sequence forked from another: n > 1)."""
        for block_id in block_ids:
            self._pin(block_id)

    def _pin(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_ids[block_id]
        self.ref_counts[block_id] += 1

    # ------------------------------------------------------------ the PrefixCache protocol

    def match(self, token_ids: list[int]) -> PrefixHit[list[int]]:
        """The longest run of cached full blocks at the start of `token_ids`, pinned."""
        keys = block_hashes(token_ids, self.block_size)
        found = self.lookup(keys)
        return self.pin(keys[: len(found)], found, queried=len(token_ids))

    def release(self, hit: PrefixHit[list[int]]) -> None:
        self.free(hit.state)

    def insert(self, token_ids: list[int], state: list[int]) -> None:
        """Name the full blocks of `token_ids`, held in blocks `state` (a block table), by their
        chained hashes."""
        keys = block_hashes(token_ids, self.block_size)
        self.name(keys, state[: len(keys)])

    # ------------------------------------------------------------ the same, in two moves

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest run of `keys` (chained names) that is cached. Only
        looks: nothing is pinned or counted, so it can be asked again and again."""
        found = []
        for key in keys:
            block_id = self.by_hash.get(key)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def free_after_pinning(self, found: list[int]) -> int:
        """Free blocks left once `found` are pinned (a freed-but-findable one leaves the list)."""
        return self.num_free - sum(1 for b in found if self.ref_counts[b] == 0)

    def pin(self, keys: list[bytes], found: list[int], queried: int) -> PrefixHit[list[int]]:
        """Pin what `lookup` found for a prompt of `queried` tokens, and count the query."""
        for block_id in found:
            self._pin(block_id)
        hit = PrefixHit(len(found) * self.block_size, found, keys)
        self.stats.queried_tokens += queried
        self.stats.hit_tokens += hit.num_tokens
        return hit

    def name(self, keys: list[bytes], block_ids: list[int]) -> None:
        """Name full blocks by the chained hashes of their tokens. The first block of a name is
        the one `lookup` finds; a block already named keeps its name."""
        for key, block_id in zip(keys, block_ids, strict=True):
            if self.block_hash[block_id] is not None:
                continue
            self.block_hash[block_id] = key
            self.by_hash.setdefault(key, block_id)

    def name_of(self, block_id: int) -> bytes:
        name = self.block_hash[block_id]
        if name is None:
            raise RuntimeError(f"KV block {block_id} is full but has no name")
        return name
