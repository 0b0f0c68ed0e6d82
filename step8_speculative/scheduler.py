"""Step 7's scheduler, changed in two places: its sequences can carry drafts (sequence.py), and
a draft that the token budget cannot hold whole this iteration is cut to what fits."""

from __future__ import annotations

from common.request import Request
from step7_real_kv.scheduler import Scheduler, Work
from step8_speculative.sequence import DraftSequence


class SpecScheduler(Scheduler):
    def new_sequence(self, request: Request) -> DraftSequence:
        return DraftSequence(request)

    def schedule(self) -> Work:
        work = super().schedule()
        for seq, n in work:
            if isinstance(seq, DraftSequence) and seq.draft and n < seq.num_pending:
                seq.draft = seq.draft[: max(0, n - 1)]  # the budget ran out inside the draft
        return work
