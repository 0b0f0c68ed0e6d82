"""The central-loader engine: one copy of the weights, loaded at startup, shared by all requests.

Each request generates on a worker thread (asyncio.to_thread), so the event loop only moves bytes:
/health and new requests are answered while a long generation runs. Requests do not wait for each
other: each runs its own forward passes, and they all compete for the same cores.
"""

from __future__ import annotations

import asyncio

from common.api import EngineLoad
from common.generation import generate
from common.model import LoadedModel
from common.request import Request


class CentralLoaderEngine:
    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._tasks: set[asyncio.Future] = set()

    async def submit(self, request: Request) -> None:
        # The default executor has min(32, cores + 4) threads: past that, requests wait there.
        task = asyncio.ensure_future(asyncio.to_thread(generate, self.lm, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self._tasks))  # nothing waits: every request runs
