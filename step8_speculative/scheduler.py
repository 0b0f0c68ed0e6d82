"""Step 7's scheduler, changed in two places: its sequences can carry drafts (sequence.py), and
a draft that the token budget cannot hold whole this iteration is cut to what fits.

It is the one writer of a draft, as of the rest of a sequence's progress: `draft` gives one
(cut to the KV slots the sequence may take), `schedule` cuts it to the budget, `end_draft`
takes it off once verified, and a preemption or the end of the sequence drops it (`reset`).
"""

from __future__ import annotations

from common.request import Request
from step7_real_kv.scheduler import Scheduler, Work
from step8_speculative.sequence import DraftSequence


class SpecScheduler(Scheduler):
    def new_sequence(self, request: Request) -> DraftSequence:
        return DraftSequence(request)

    def draft(self, seq: DraftSequence, tokens: list[int]) -> None:
        """Give a decoding sequence a draft, in the slots its blocks have left and at most one
        block more: a draft may take a free block, never make the scheduler preempt anyone."""
        size = self.blocks.block_size
        have = len(seq.block_table) * size - seq.num_computed - 1  # slots after its last token
        seq.draft = tokens[: max(0, have + size)]

    def schedule(self) -> Work:
        work = super().schedule()
        for seq, n in work:
            if isinstance(seq, DraftSequence) and seq.draft and n < seq.num_pending:
                seq.draft = seq.draft[: max(0, n - 1)]  # the budget ran out inside the draft
        return work

    def end_draft(self, seq: DraftSequence) -> list[int]:
        """Take the verified draft off the sequence, before its kept tokens are appended to
        the request (and `advance` moves its computed count by them)."""
        draft, seq.draft = seq.draft, []
        return draft
