"""Admission that also counts KV blocks: a prompt gets in only if the pool has room for it.

Step 6 bounds the waiting requests and their prompt tokens, which says nothing about memory.
Here the memory is a pool of blocks, so the door can ask the real question: would the sequences
already waiting (preempted ones included), plus this one, fit in the blocks that are free right
now? If not, the request would only wait for running sequences to finish (or force preemptions,
which throw computed work away), so it gets a 429 at once, with step 6's Retry-After, under the
reason `kv_blocks`. A request that could not fit even in an empty pool is refused earlier, while
it is validated (`PoolServing`): a 400, since retrying would never help.

Free blocks include freed-but-findable ones (reusing them only evicts a cached prefix). The
count is conservative: a prompt whose prefix is cached needs fewer new blocks than counted here.
The engine answers it (`kv_demand`) on the event loop, which owns the scheduler, so it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.request import Request
from step6_backpressure.admission import AdmissionController, LimitedServing, QueueingEngine


class PagedEngineLike(QueueingEngine, Protocol):
    def kv_demand(self, request: Request) -> tuple[int, int]: ...

    def require_fit(self, request: Request) -> None: ...


class KVAdmission(AdmissionController):
    engine: PagedEngineLike

    def admit(self, request: Request) -> None:
        if not self.lifecycle.draining:  # a draining server answers 503 first (step 6)
            needed, free = self.engine.kv_demand(request)
            if needed > free:
                self.reject(
                    "kv_blocks", 429, f"waiting prompts need {needed} KV blocks, {free} are free"
                )
        super().admit(request)


@dataclass
class PoolServing(LimitedServing):
    """Step 6's validation, and one more question: could the whole pool ever hold it?"""

    engine: PagedEngineLike

    def make_request(self, prompt_ids, params, rid, prompt_param: str, **choice) -> Request:
        request = super().make_request(prompt_ids, params, rid, prompt_param, **choice)
        self.engine.require_fit(request)
        return request
