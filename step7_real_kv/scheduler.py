"""Continuous batching: before every forward pass, decide which sequences run and how far.

Step 3 fixed a batch when it started. Here the batch is rebuilt every iteration:

- running sequences go first, oldest first: a decoding one gets 1 token, one still prefilling
  gets the next chunk of its prompt;
- then waiting sequences are admitted while the token budget (max_num_batched_tokens), the
  sequence cap (max_num_seqs) and the free blocks allow; each starts after the longest prefix
  the block manager already holds;
- a long prompt takes only what is left of the budget: it is prefilled in chunks across
  iterations, side by side with the decodes, instead of stalling them; an iteration in which
  no sequence decodes stalls no stream, so it may have a bigger budget (max_prefill_tokens,
  off by default): a lone long prompt in one chunk, its matmuls on more rows at once (the
  README's "Long prompts");
- when a running sequence needs a block and none is free, the youngest running sequence is
  preempted: its blocks are freed and it goes back to the front of the queue, WAITING again.
  Its tokens (prompt and output so far) are kept, so later it is prefilled again, mostly from
  the prefix cache, and carries on; nothing already streamed is streamed again.

The scheduler is the one owner of where a step 7 request is: `waiting`, `running`, and `forks`
(the choices of an n > 1 request waiting for their leader's prompt). Only its methods change them
and their status; everything else asks it: `load()` for the counts (metrics, step 6's door,
readiness, the drain), `kv_demand()` for the door's block count, `expire()` for a deadline,
`forks_due()` and `fork()` for the choices, `cancelled()` and `finish()` for the ones leaving.
A finished or cancelled sequence leaves at once and its blocks go back to the pool.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from common.api import EngineLoad
from common.config import ConfigPart, knob
from common.errors import APIError
from common.prefix import block_hashes
from common.request import Request, RequestStatus
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.sequence import Sequence

Work = list[tuple[Sequence, int]]  # (sequence, new tokens this iteration)


@dataclass(frozen=True)
class SchedulerConfig(ConfigPart):
    max_num_batched_tokens: int = knob(256, "new tokens per iteration: decodes + prefill chunks")
    max_num_seqs: int = knob(64, "sequences running at once")
    max_prefill_tokens: int = knob(
        0,
        "new tokens of an iteration in which no sequence decodes, e.g. 2048: a lone long "
        "prompt in one chunk (0, or anything below max_num_batched_tokens: "
        "max_num_batched_tokens)",
    )

    prefill_chunk_while_decoding: int = knob(
        0,
        "prompt tokens an iteration runs beside sequences that are decoding (their streams "
        "wait for the whole iteration), e.g. 16; 0: as many as max_num_batched_tokens holds",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefill_chunk_while_decoding < 0:
            raise ValueError("prefill_chunk_while_decoding must be >= 0")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig) -> None:
        self.blocks = blocks
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_num_seqs = config.max_num_seqs
        self.max_prefill_tokens = max(config.max_prefill_tokens, self.max_num_batched_tokens)
        self.prefill_chunk_while_decoding = config.prefill_chunk_while_decoding
        self.prompt_budget = self.max_num_batched_tokens  # this iteration's, for prompt tokens
        self.budget = self.max_num_batched_tokens  # the last iteration's, for the timeline
        self.waiting: deque[Sequence] = deque()  # arrival order, preempted ones at the front
        self.running: list[Sequence] = []  # admission order: the last is the youngest
        # n > 1: the other choices of a request wait here for its first choice (the leader)
        # to prefill the prompt, then start from its blocks (`fork`).
        self.forks: dict[Request, list[Request]] = {}
        self.num_preemptions = 0
        self.admitted: dict[Sequence, int] = {}  # what the last schedule() let in ...
        self.preempted: list[Sequence] = []  # ... and preempted
        # The head of `waiting` when it last could not get its blocks, and the free count
        # then: until more blocks are free it is not looked up again (nor counted again).
        self._blocked: tuple[Sequence, int] | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------ asked from outside

    def _waiting_tokens(self) -> list[int]:
        """The tokens each live waiting sequence (or choice waiting to fork) must prefill."""
        tokens = [s.num_tokens for s in self.waiting if not s.request.cancelled]
        for children in self.forks.values():
            tokens += [c.num_tokens for c in children if not c.cancelled]
        return tokens

    def load(self) -> EngineLoad:
        waiting = self._waiting_tokens()
        running = sum(1 for s in self.running if not s.request.cancelled)
        return EngineLoad(len(waiting), sum(waiting), running)

    def kv_demand(self, request: Request) -> tuple[int, int]:
        """(blocks for every live waiting sequence's tokens plus `request`'s prompt, blocks
        free now). Conservative: a cached prefix, or a prompt a choice will share with its
        leader, is counted as needing new blocks."""
        tokens = [*self._waiting_tokens(), request.num_prompt_tokens]
        return sum(self.blocks.blocks_for(n) for n in tokens), self.blocks.num_free

    def fits(self, request: Request) -> bool:
        """Whether the whole pool could hold this request at its longest (else it never runs)."""
        longest = request.num_prompt_tokens + request.max_tokens
        return self.blocks.blocks_for(longest) <= self.blocks.num_blocks

    def require_fit(self, request: Request) -> None:
        """A 400 for a request that even an empty pool could not hold: a retry would not help.
        The server asks it while validating, before any queue."""
        if not self.fits(request):
            slots = self.blocks.num_blocks * self.blocks.block_size
            raise APIError(
                f"prompt plus max_tokens needs more than the whole KV pool ({slots} tokens)",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def add(self, request: Request) -> Sequence | None:
        """Queue a validated request (`require_fit` passed). A later choice of a request whose
        first choice has not prefilled the prompt yet waits to fork from it instead."""
        leader = request.siblings[0]
        if request is not leader and leader in self.forks:
            self.forks[leader].append(request)
            return None
        if request is leader and len(request.siblings) > 1:
            self.forks[request] = []
        seq = self.new_sequence(request)
        self.waiting.append(seq)
        return seq

    def new_sequence(self, request: Request) -> Sequence:
        """The one place a request becomes a sequence of this scheduler."""
        return Sequence(request)

    def expire(self, request: Request, error: APIError) -> bool:
        """Fail a request that has not started yet and take it out of `waiting`; False when
        it runs, has run (a preempted one waits again, but it has started), or is gone."""
        children = self.forks.get(request.siblings[0], [])
        if request in children and not request.cancelled:
            children.remove(request)
            request.fail(error)
            return True
        for seq in self.waiting:
            if seq.request is request:
                if seq.num_preemptions or request.cancelled:
                    return False
                self.waiting.remove(seq)
                request.fail(error)
                return True
        return False

    # ------------------------------------------------------------ each iteration

    def schedule(self) -> Work:
        self.admitted = {}  # let in this iteration: cached prompt tokens
        self.preempted = []  # preempted this iteration
        budget = self.budget = self._budget()
        self.prompt_budget = self._prompt_budget(budget)
        preemptions_before = self.num_preemptions
        work = self._schedule_running(budget)
        budget -= sum(n for _, n in work)
        if self.num_preemptions == preemptions_before:  # no newcomers while the pool is short
            work += self._admit_waiting(budget)
        return work

    def _budget(self) -> int:
        """New tokens this iteration: max_num_batched_tokens while a running sequence has
        begun its answer (its stream waits for the whole iteration), else max_prefill_tokens."""
        if any(seq.request.output_ids for seq in self.running):
            return self.max_num_batched_tokens
        return self.max_prefill_tokens

    def _prompt_budget(self, budget: int) -> int:
        """Prompt tokens (prefill chunks, not decodes) this iteration may run: at most
        prefill_chunk_while_decoding when it is set and a running sequence has begun its
        answer, so a newcomer's prompt adds only a few rows to the decoding streams' iteration
        (over more iterations: its own first token comes later)."""
        decoding = any(seq.request.output_ids for seq in self.running)
        if decoding and self.prefill_chunk_while_decoding:
            return min(budget, self.prefill_chunk_while_decoding)
        return budget

    def _take(self, seq: Sequence, n: int) -> int:
        """`n` of `seq`'s pending tokens, fewer if they are a prompt's chunk (more than the
        one token a decode runs) beyond the iteration's prompt budget."""
        if seq.request.num_tokens - seq.num_computed <= 1:
            return n  # a decode (with its draft, step 8): never held back
        n = min(n, self.prompt_budget)
        self.prompt_budget -= n
        return n

    def _schedule_running(self, budget: int) -> Work:
        work: Work = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._take(seq, min(seq.num_pending, budget))
            if n == 0:  # a prompt's chunk, and the prompt budget is spent: next iteration
                i += 1
                continue
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
            if self.prompt_budget == 0:
                break  # newcomers start with a prompt's chunk: next iteration
            seq = self.waiting[0]
            if self._blocked == (seq, self.blocks.num_free):
                break  # nothing was freed since it last did not fit
            n = self._try_start(seq, budget)
            if n is None:
                self._blocked = (seq, self.blocks.num_free)
                break
            self._blocked = None
            work.append((seq, n))
            budget -= n
        return work

    def _try_start(self, seq: Sequence, budget: int) -> int | None:
        """Start the head of `waiting` after its longest cached prefix, if its first chunk's
        blocks are free: the new tokens it runs now, or None (nothing changed, nothing
        counted)."""
        # All but the last token may come from the cache: at least one runs, for its logits.
        keys = block_hashes(seq.token_ids[:-1], self.blocks.block_size)
        found = self.blocks.lookup(keys)
        partial, filled = self.partial_block(seq) if len(found) == len(keys) else ([], 0)
        cached = len(found) * self.blocks.block_size + filled
        n = min(seq.num_tokens - cached, budget, self.prompt_budget)
        need = self.blocks.blocks_for(cached + n) - len(found) - len(partial)
        if need > self.blocks.free_after_pinning(found):
            return None
        hit = self.blocks.pin(keys[: len(found)], found, queried=len(seq.token_ids) - 1)
        self.waiting.popleft()
        seq.block_table = hit.state + partial + self.blocks.allocate(need)
        seq.num_computed = hit.num_tokens + filled
        self.admitted[seq] = seq.num_computed
        self._run(seq)
        self.prompt_budget -= n
        return n

    def partial_block(self, seq: Sequence) -> tuple[list[int], int]:
        """A block that holds the prompt's tokens after its cached prefix already, and how many
        it holds: none here. (Step 10's decode engine has one, taken in from its prefill
        engine; a block still filling has no name, so no lookup finds it.)"""
        return [], 0

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
        self.preempted.append(seq)

    # ------------------------------------------------------------ after the forward pass

    def advance(self, seq: Sequence, n: int) -> None:
        """`n` more of `seq`'s tokens are in the pool. The blocks they filled are named, so
        the prefix cache can find them: only the new ones are hashed, the chain going on from
        the name of the block before them."""
        size = self.blocks.block_size
        before = seq.num_computed // size
        seq.num_computed += n
        after = seq.num_computed // size
        if after > before:
            parent = self.blocks.name_of(seq.block_table[before - 1]) if before else b""
            keys = block_hashes(seq.token_ids[before * size : after * size], size, parent)
            self.blocks.name(keys, seq.block_table[before:after])

    # ------------------------------------------------------------ n > 1: one prompt, n choices

    def fork(self, leader: Sequence, child: Request) -> tuple[Sequence, tuple[int, int] | None]:
        """`child` starts where `leader` is, just after the prompt: it shares the leader's full
        blocks (one more reference each); the leader's last, partly filled block, which both
        will write into next, is copied into a block of the child's own. Returns the child's
        sequence and the (from, to) block copy the engine must make, or None."""
        size = self.blocks.block_size
        full, partial = divmod(leader.num_computed, size)
        shared = leader.block_table[:full]
        self.blocks.share(shared)
        seq = self.new_sequence(child)
        seq.block_table = list(shared)
        copy = None
        if partial:
            (own,) = self.blocks.allocate(1)
            seq.block_table.append(own)
            copy = (leader.block_table[full], own)
        seq.num_computed = leader.num_computed
        self._run(seq)
        child.cached_prompt_tokens = leader.request.cached_prompt_tokens
        return seq, copy

    def forks_due(self, work: Work) -> dict[Sequence, list[Request]]:
        """The leaders whose prompt is all computed once `work` has run, each with the choices
        that will `fork` from it then. A leader whose prompt ends inside a block needs a free
        block per choice (for its copy of that block): the choices there is no block for start
        on their own, first in line."""
        due: dict[Sequence, list[Request]] = {}
        free = self.blocks.num_free
        for seq, n in work:
            if seq.request not in self.forks or seq.num_computed + n < seq.num_tokens:
                continue
            children = [c for c in self.forks.pop(seq.request) if not c.cancelled]
            room = len(children)
            if (seq.num_computed + n) % self.blocks.block_size:
                room = min(room, free)
                free -= room  # each copy takes one
            due[seq] = children[:room]
            self._start_alone(children[room:])
        return due

    def release_forks(self, leader: Request) -> None:
        """A leader that ends before its prompt was computed: its choices start on their own."""
        self._start_alone(self.forks.pop(leader, []))

    def _start_alone(self, choices: list[Request]) -> None:
        """Choices that will not fork go to the front of `waiting`, in their order."""
        for child in reversed(choices):
            self.waiting.appendleft(self.new_sequence(child))

    # ------------------------------------------------------------ leaving

    def cancelled(self) -> list[Sequence]:
        """The running and waiting sequences whose client has left (to be `finish`ed)."""
        return [s for s in [*self.running, *self.waiting] if s.request.cancelled]

    def drop_cancelled_forks(self) -> list[Request]:
        """Take out the choices waiting to fork whose client has left; they are returned."""
        dropped = []
        for children in self.forks.values():
            dropped += [c for c in children if c.cancelled]
            children[:] = [c for c in children if not c.cancelled]
        return dropped

    def finish(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out, wherever it is, and free its blocks."""
        self.release_forks(seq.request)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self._blocked is not None and self._blocked[0] is seq:
            self._blocked = None
        self.blocks.free(seq.block_table)
        seq.reset()
