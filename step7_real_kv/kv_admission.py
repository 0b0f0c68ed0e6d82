"""Admission that also counts KV blocks: a prompt gets in only if the pool has room for it.

Step 6 bounds the waiting requests and their prompt tokens, which says nothing about memory.
Here the memory is a pool of blocks, so the door can ask the real question: would the prompts
already waiting, plus this one, fit in the blocks that are free right now? If not, the request
would only wait for running sequences to finish (or force preemptions, which throw computed work
away), so it gets a 429 at once, with step 6's Retry-After, under the reason `kv_blocks`.

Free blocks include freed-but-findable ones (reusing them only evicts a cached prefix). The
count is conservative: a prompt whose prefix is cached needs fewer new blocks than counted here.
"""

from __future__ import annotations

from common.request import Request
from step6_backpressure.admission import AdmissionController, Limits
from step7_real_kv.block_manager import BlockManager


class KVAdmission(AdmissionController):
    def __init__(self, limits: Limits, blocks: BlockManager, drain_window_s: float = 30.0) -> None:
        super().__init__(limits, drain_window_s)
        self.blocks = blocks

    def blocks_needed(self, request: Request) -> int:
        """Blocks for the prompts of everything waiting, and of this request."""
        waiting = [*self.waiting(), request]
        return sum(self.blocks.blocks_for(r.num_prompt_tokens) for r in waiting)

    def admit(self, request: Request) -> None:
        if not self.draining:  # a draining server answers 503 first (step 6)
            needed, free = self.blocks_needed(request), self.blocks.num_free
            if needed > free:
                self._reject(
                    "kv_blocks", 429, f"waiting prompts need {needed} KV blocks, {free} are free"
                )
        super().admit(request)
