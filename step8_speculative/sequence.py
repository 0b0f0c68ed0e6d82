"""Step 7's sequence, changed: it may carry a draft, tokens proposed but not yet verified.

The draft sits after the request's own tokens, so to the scheduler and the batch builder a
sequence with a draft of k tokens simply has 1 + k tokens pending: the last sampled token and
the k guesses, scheduled, budgeted and given KV slots like a short prefill chunk. The request
never sees a draft: only what verification accepts is appended to it (engine.py). After a
preemption, or once verified, the draft is gone. The scheduler is the one that writes it. The
sequence also keeps how often its drafts were accepted (draft_policy.py), which sets how long
its next draft may be.
"""

from __future__ import annotations

from common.request import Request
from step7_real_kv.sequence import Sequence
from step8_speculative.draft_policy import Acceptance


class DraftSequence(Sequence):
    def __init__(self, request: Request) -> None:
        super().__init__(request)
        self.draft: list[int] = []  # proposed tokens, not yet verified (SpecScheduler's)
        self.drafted = 0  # tokens proposed for this sequence so far ...
        self.accepted = 0  # ... and accepted
        self.acceptance = Acceptance()  # how often its drafts hit: how long the next may be

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids + self.draft if self.draft else self.request.token_ids

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens + len(self.draft)

    def reset(self) -> None:
        super().reset()
        self.draft = []
