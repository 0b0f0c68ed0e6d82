"""Continuous batching: before every forward pass, decide which sequences run and how far.

Step 3 fixed a batch when it started. Here the batch is rebuilt every iteration:

- running sequences go first, oldest first: a decoding one gets 1 token, one still prefilling
  gets the next chunk of its prompt;
- then waiting sequences are admitted while the token budget (max_num_batched_tokens), the
  sequence cap (max_num_seqs) and the free blocks allow; each starts after the longest prefix
  the block manager already holds;
- a long prompt takes only what is left of the budget: it is prefilled in chunks across
  iterations, side by side with the decodes, instead of stalling them;
- when a running sequence needs a block and none is free, the youngest running sequence is
  preempted: its blocks are freed and it goes back to the front of the queue, WAITING again.
  Its tokens (prompt and output so far) are kept, so later it is prefilled again, mostly from
  the prefix cache, and carries on; nothing already streamed is streamed again.

A finished or cancelled sequence leaves at once and its blocks go back to the pool. `waiting` is
the one place a step 7 request waits: admission (kv_admission.py) counts what is there.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from common.errors import APIError
from common.prefix import block_hashes
from common.request import Request, RequestStatus
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.sequence import Sequence

if TYPE_CHECKING:
    from step7_real_kv.engine import EngineConfig

Work = list[tuple[Sequence, int]]  # (sequence, new tokens this iteration)


class Scheduler:
    def __init__(self, blocks: BlockManager, config: EngineConfig) -> None:
        self.blocks = blocks
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.waiting: deque[Sequence] = deque()  # arrival order, preempted ones at the front
        self.running: list[Sequence] = []  # admission order: the last is the youngest
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits(self, request: Request) -> bool:
        """Whether the whole pool could hold this request at its longest (else it never runs)."""
        longest = request.num_prompt_tokens + request.max_tokens
        return self.blocks.blocks_for(longest) <= self.blocks.num_blocks

    def require_fit(self, request: Request) -> None:
        """A 400 for a request that even an empty pool could not hold: a retry would not help."""
        if not self.fits(request):
            slots = self.blocks.num_blocks * self.blocks.block_size
            raise APIError(
                f"prompt plus max_tokens needs more than the whole KV pool ({slots} tokens)",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def add(self, request: Request) -> Sequence:
        self.require_fit(request)
        seq = Sequence(request)
        self.waiting.append(seq)
        return seq

    def schedule(self) -> Work:
        budget = self.max_num_batched_tokens
        preemptions_before = self.num_preemptions
        work = self._schedule_running(budget)
        budget -= sum(n for _, n in work)
        if self.num_preemptions == preemptions_before:  # no newcomers while the pool is short
            work += self._admit_waiting(budget)
        return work

    def _schedule_running(self, budget: int) -> Work:
        work: Work = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            if not self._make_room(seq, seq.num_computed + n):
                break  # `seq` was the youngest and had to go itself
            work.append((seq, n))
            budget -= n
            i += 1
        return work

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` slots of `seq`, preempting the youngest running sequences
        (never an older one, so never one already scheduled) until they fit."""
        while not self._grow(seq, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, budget: int) -> Work:
        work: Work = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # Match all but the last token: at least one must run to produce logits.
            hit = self.blocks.match(seq.token_ids[:-1])
            n = min(seq.num_tokens - hit.num_tokens, budget)
            need = self.blocks.blocks_for(hit.num_tokens + n) - len(hit.state)
            if need > self.blocks.num_free:
                self.blocks.release(hit)
                break
            self.waiting.popleft()
            seq.block_table = hit.state + self.blocks.allocate(need)
            seq.block_names = hit.keys
            seq.num_computed = hit.num_tokens
            self._run(seq)
            work.append((seq, n))
            budget -= n
        return work

    def _run(self, seq: Sequence) -> None:
        request = seq.request
        if seq.num_preemptions == 0:  # the first admission is what the client waited for
            request.queue_wait_s = time.monotonic() - request.arrival_time
            request.cached_prompt_tokens = seq.num_computed
        request.status = RequestStatus.RUNNING
        self.running.append(seq)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` slots; False when the pool is short."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.blocks.num_free:
            return False
        if need > 0:
            seq.block_table += self.blocks.allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.reset()
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.request.status = RequestStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out, wherever it is, and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.reset()

    def name_full_blocks(self, seq: Sequence) -> None:
        """Offer blocks that the last iteration filled to the prefix cache. Only the new blocks
        are hashed: the chain goes on from the name of the last block already named."""
        size = self.blocks.block_size
        named, full = len(seq.block_names), seq.num_computed // size
        if full > named:
            parent = seq.block_names[-1] if seq.block_names else b""
            keys = block_hashes(seq.token_ids[named * size : full * size], size, parent)
            self.blocks.name(keys, seq.block_table[named:full])
            seq.block_names += keys
