"""Step 8's scheduler, changed in one place: blocks taken in from a prefill engine stay pinned
until their request's sequence runs.

The decode engine names the blocks it takes in (engine.py), so the scheduler finds them as a
cached prefix when it admits the request, like any computed block. Between taking them in and
that admission the request waits in the queue, and a freed block may be handed to another
sequence meanwhile; so the engine pins them here, and the pins go when the sequence starts
(after the scheduler has pinned them for it), ends, or expires unstarted.
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

    def pin_until_running(self, request: Request, block_ids: list[int]) -> None:
        """Hold one reference to each of `block_ids` (taken already) until `request` runs."""
        self.unpin(request)
        self.import_pins[request] = block_ids

    def unpin(self, request: Request) -> None:
        self.blocks.free(self.import_pins.pop(request, []))

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
