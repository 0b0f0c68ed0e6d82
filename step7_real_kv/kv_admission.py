"""Admission that also counts KV blocks: a prompt gets in only if the pool has room for it.

Step 6 bounds the waiting requests and their prompt tokens, which says nothing about memory.
Here the memory is a pool of blocks, so the door can ask the real question: would the sequences
already waiting (preempted ones included), plus this one, fit in the blocks that are free right
now? If not, the request would only wait for running sequences to finish (or force preemptions,
which throw computed work away), so it gets a 429 at once, with step 6's Retry-After, under the
reason `kv_blocks`. A request that could not fit even in an empty pool gets a 400: retrying
would never help.

Free blocks include freed-but-findable ones (reusing them only evicts a cached prefix). The
count is conservative: a prompt whose prefix is cached needs fewer new blocks than counted here.
It reads the scheduler on the event loop, which owns it (engine.py), so the count is exact.
"""

from __future__ import annotations

from common.request import Request
from step6_backpressure.admission import AdmissionConfig, AdmissionController
from step7_real_kv.scheduler import Scheduler


class KVAdmission(AdmissionController):
    def __init__(
        self, limits: AdmissionConfig, scheduler: Scheduler, drain_window_s: float = 30.0
    ) -> None:
        super().__init__(limits, drain_window_s)
        self.scheduler = scheduler
        self.blocks = scheduler.blocks

    def blocks_needed(self, request: Request) -> int:
        """Blocks for the tokens of every live waiting sequence, and for this request's prompt."""
        waiting = [s.num_tokens for s in self.scheduler.waiting if not s.request.cancelled]
        tokens = [*waiting, request.num_prompt_tokens]
        return sum(self.blocks.blocks_for(n) for n in tokens)

    def admit(self, request: Request) -> None:
        self.scheduler.require_fit(request)  # 400 before any 429 or 503
        if not self.draining:  # a draining server answers 503 first (step 6)
            needed, free = self.blocks_needed(request), self.blocks.num_free
            if needed > free:
                self._reject(
                    "kv_blocks", 429, f"waiting prompts need {needed} KV blocks, {free} are free"
                )
        super().admit(request)
