"""Step 8's scheduler, changed in two places: blocks taken in from a prefill engine stay pinned
until their request's sequence runs, and a prompt's partial last block taken in joins the
cached prefix it follows.

The decode engine names the full blocks it takes in (engine.py), so the scheduler finds them as
a cached prefix when it admits the request, like any computed block. Between taking them in and
that admission the request waits in the queue, and a freed block may be handed to another
sequence meanwhile; so the engine pins them here, and the pins go when the sequence starts
(after the scheduler has pinned them for it), ends, or expires unstarted.

The partial block has no name (no prefix cache finds a block that is still filling): the
scheduler gives it to the sequence as it admits it, after the cached prefix, and counts its
tokens as computed. So the request runs only its prompt's last token here, one row, however far
into a block the prompt ends: a long prompt's tail does not slow the decoding streams beside it.
"""

from __future__ import annotations

from common.errors import APIError
from common.prefix import block_hashes
from common.request import Request
from step7_real_kv.sequence import Sequence
from step8_speculative.scheduler import SpecScheduler


class DisaggScheduler(SpecScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.import_pins: dict[Request, list[int]] = {}  # blocks taken in, per waiting request
        self.import_tails: dict[Request, tuple[int, int]] = {}  # (partial block, its tokens)

    def pin_until_running(
        self, request: Request, block_ids: list[int], tail: tuple[int, int] | None = None
    ) -> None:
        """Hold one reference to each of `block_ids` (taken already) until `request` runs, and
        the partial block `tail` (its id and how many tokens it holds) until it is the
        sequence's."""
        self.unpin(request)
        self.import_pins[request] = block_ids
        if tail is not None:
            self.import_tails[request] = tail

    def unpin(self, request: Request) -> None:
        self.blocks.free(self.import_pins.pop(request, []))
        tail = self.import_tails.pop(request, None)
        if tail is not None:
            self.blocks.free([tail[0]])

    def _try_start(self, seq: Sequence, budget: int) -> int | None:
        """Step 7's admission, with the partial block taken in after the cached prefix."""
        tail = self.import_tails.get(seq.request)
        size = self.blocks.block_size
        keys = block_hashes(seq.token_ids[:-1], size)
        found = self.blocks.lookup(keys)
        if tail is None or len(found) < len(keys):  # nothing taken in, or not all of it held
            return super()._try_start(seq, budget)
        block_id, count = tail
        cached = len(found) * size + count
        n = min(seq.num_tokens - cached, budget, self.prompt_budget)
        need = self.blocks.blocks_for(cached + n) - len(found) - 1
        if need > self.blocks.free_after_pinning(found):
            return None
        hit = self.blocks.pin(keys, found, queried=len(seq.token_ids) - 1)
        del self.import_tails[seq.request]  # the sequence's block now: its pin is the table's
        self.waiting.popleft()
        seq.block_table = [*hit.state, block_id, *self.blocks.allocate(need)]
        seq.num_computed = cached
        self.admitted[seq] = cached
        self._run(seq)
        self.prompt_budget -= n
        return n

    def _run(self, seq: Sequence) -> None:
        super()._run(seq)
        self.unpin(seq.request)

    def finish(self, seq: Sequence) -> None:
        super().finish(seq)
        self.unpin(seq.request)

    def expire(self, request: Request, error: APIError) -> bool:
        expired = super().expire(request, error)
        if expired:
            self.unpin(request)
        return expired
