"""Leases: the prefill engine keeps a prompt's handed-over blocks until the decode engine is done
with them, or until the lease runs out.

When a request that asked for a remote decode (`kv_transfer_params.do_remote_decode`) finishes
its prefill, `hold` takes one more reference to each block of its prompt that the decode engine
will take (block_manager's `share`), so the request's own end does not free them. Every way out
drops that reference exactly once: the decode engine confirms (`release(..., "confirmed")`),
cancels (`"cancelled"`), or never comes back (`expire`, after `kv_lease_s`). A block whose last
reference goes is free again, and still findable by its name, like any freed block.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from common.prefix import block_hashes
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.paged_kv import PagedKVCache
from step10_disaggregated.kv_connector import KVBlocks, TransferError, header, remove_file


@dataclass
class Lease:
    block_ids: list[int]
    names: list[bytes]
    expires_at: float  # on the monotonic clock
    files: list[str] = field(default_factory=list)  # shared-memory copies not yet taken


@dataclass
class TransferStats:
    blocks_sent: int = 0
    bytes_sent: int = 0
    blocks_received: int = 0
    bytes_received: int = 0
    transfer_s: float = 0.0  # time the decode side spent fetching, in seconds
    ended: Counter[str] = field(default_factory=Counter)  # leases ended, by how
    messages: Counter[str] = field(default_factory=Counter)  # fetches answered, by way (via)


def handed_over(prompt_ids: list[int], block_size: int) -> tuple[list[bytes], int]:
    """The names of the blocks a prompt hands over, and how many tokens the last one holds
    when it is partly filled (0 when it is full). What moves is every token of the prompt but
    the last, which the decode engine computes itself, for its logits (vLLM's connectors do the
    same): the full blocks, named by their chained hashes as in any prefix cache, then the
    partial block of the rest, named by the hash of its tokens on the same chain. That last
    name only checks that the block is this prompt's: no prefix cache names a partial block."""
    tokens = prompt_ids[:-1]
    names = block_hashes(tokens, block_size)
    tail = len(tokens) - len(names) * block_size
    if tail:
        names += block_hashes(tokens[-tail:], tail, names[-1] if names else b"")
    return names, tail


class Leases:
    def __init__(self, blocks: BlockManager, kv: PagedKVCache, lease_s: float) -> None:
        self.blocks, self.kv, self.lease_s = blocks, kv, lease_s
        self.held: dict[str, Lease] = {}  # by the prefill request's id
        self.stats = TransferStats()

    def hold(self, request_id: str, prompt_ids: list[int], block_table: list[int]) -> Lease:
        """Keep the blocks of a computed prompt that the decode engine will take (all but the
        last token's: `handed_over`). The partial block is nobody's once the request ends, and
        nothing writes into it while the lease holds it."""
        names, _ = handed_over(prompt_ids, self.blocks.block_size)
        block_ids = block_table[: len(names)]
        self.blocks.share(block_ids)
        lease = Lease(block_ids, names, time.monotonic() + self.lease_s)
        self.release(request_id, "replaced")  # a request id used twice keeps one lease
        self.held[request_id] = lease
        return lease

    def read(self, request_id: str, skip: int) -> KVBlocks:
        """The leased blocks after the first `skip`: their names, keys and values (copies)."""
        with self.lend(request_id, skip) as (names, block_ids):
            return self.gather(names, block_ids)

    @contextmanager
    def lend(self, request_id: str, skip: int) -> Iterator[tuple[list[bytes], list[int]]]:
        """The names and ids of the leased blocks after the first `skip`, with one more
        reference while the caller copies them (on a worker thread, say): a lease released or
        expired meanwhile cannot free them under the copy. On the event loop, like every call
        into the block manager."""
        lease = self.held.get(request_id)
        if lease is None:
            raise TransferError(f"no KV blocks held for {request_id!r} (expired or released)")
        names, block_ids = lease.names[skip:], lease.block_ids[skip:]
        self.blocks.share(block_ids)
        try:
            yield names, block_ids
        finally:
            self.blocks.free(block_ids)
        self.stats.blocks_sent += len(block_ids)
        self.stats.bytes_sent += len(block_ids) * self.kv.bytes_per_block

    def gather(
        self, names: list[bytes], block_ids: list[int], out: torch.Tensor | None = None
    ) -> KVBlocks:
        """Copy blocks out of the pool into one buffer, keys then values (the wire format's
        order, so encode sends it as it lies): a new one, or `out`, [2, layers, slots, kv_heads,
        head_dim]. Reads only the pool: safe on a worker thread while the blocks are lent,
        since nothing writes a leased block."""
        k, v = self.kv.k, self.kv.v
        size = self.blocks.block_size
        if out is None:
            out = k.new_empty((2, k.shape[0], len(block_ids) * size, *k.shape[2:]))
        ids = torch.tensor(block_ids, dtype=torch.long)
        for pool, part in ((k, out[0]), (v, out[1])):
            # [layers, blocks, block_size * kv_heads * head_dim]: a block is one row per layer
            torch.index_select(by_block(pool, size), 1, ids, out=by_block(part, size))
        return KVBlocks(names, out[0], out[1])

    def gather_to_file(self, names: list[bytes], block_ids: list[int], directory: str) -> str:
        """The blocks as one message (kv_connector's format) in a new file of `directory`
        (/dev/shm: memory shared with the other processes of this machine), written in place:
        one copy out of the pool, as `gather` makes. Its path; the reader unlinks it."""
        k = self.kv.k
        shape = [k.shape[0], len(block_ids) * self.blocks.block_size, *k.shape[2:]]
        head = header(names, shape, k.dtype)
        size = len(head) + 2 * math.prod(shape) * k.element_size()
        fd, path = tempfile.mkstemp(prefix="gateway-kv-", dir=directory)
        try:
            try:  # the room, now: a full tmpfs would otherwise kill the writer (SIGBUS) mid-copy
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise TransferError(f"no room for {size} bytes in {directory}: {exc}") from exc
            with mmap.mmap(fd, size) as mapped:
                mapped[: len(head)] = head
                out = torch.frombuffer(mapped, dtype=k.dtype, offset=len(head))
                self.gather(names, block_ids, out.view(2, *shape))
                del out  # the view goes before the mapping closes
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path

    def attach_file(self, request_id: str, path: str) -> None:
        """`path` holds a copy of the lease's blocks: unlinked when the lease ends, if the
        reader has not unlinked it (a decode engine that died before reading it)."""
        lease = self.held.get(request_id)
        if lease is None:
            remove_file(path)
        else:
            lease.files.append(path)

    def release(self, request_id: str, how: str) -> bool:
        """Drop a lease's references; False when there was none (released before, expired)."""
        lease = self.held.pop(request_id, None)
        if lease is None:
            return False
        self.blocks.free(lease.block_ids)
        for path in lease.files:
            remove_file(path)
        self.stats.ended[how] += 1
        return True

    def expire(self, now: float | None = None) -> int:
        """Release every lease past its time; how many were."""
        now = time.monotonic() if now is None else now
        late = [rid for rid, lease in self.held.items() if lease.expires_at <= now]
        for rid in late:
            self.release(rid, "expired")
        return len(late)

    def release_all(self, how: str) -> None:
        for rid in list(self.held):
            self.release(rid, how)


def by_block(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """[layers, slots, kv_heads, head_dim] viewed as [layers, blocks, block_size * kv_heads *
    head_dim]: each block's slots in one layer are one contiguous row (no copy)."""
    return kv.view(kv.shape[0], -1, block_size * kv.shape[2] * kv.shape[3])


def block_slots(block_ids: list[int], block_size: int) -> torch.Tensor:
    """The slot numbers of whole blocks, in order: [len(block_ids) * block_size]."""
    ids = torch.tensor(block_ids, dtype=torch.long)
    return (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)
