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

    def partial_block(self, seq: Sequence) -> tuple[list[int], int]:
        """The partial block taken in, after the cached prefix that step 7's admission found."""
        tail = self.import_tails.get(seq.request)
        return ([tail[0]], tail[1]) if tail is not None else ([], 0)

    def _run(self, seq: Sequence) -> None:
        super()._run(seq)
        tail = self.import_tails.get(seq.request)
        if tail is not None and tail[0] in seq.block_table:
            del self.import_tails[seq.request]  # the sequence's block now: its pin is the table's
        self.unpin(seq.request)

    def finish(self, seq: Sequence) -> None:
        super().finish(seq)
        self.unpin(seq.request)

    def expire(self, request: Request, error: APIError) -> bool:
        expired = super().expire(request, error)
        if expired:
            self.unpin(request)
        return expired
