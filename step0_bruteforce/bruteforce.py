"""The brute-force engine: load the weights inside every request, generate, drop them.

Everything runs on the event loop thread. Loading (about 2 s) and every forward pass block the
loop, so while one request loads, no other request, not even /health, gets an answer; the short
`await asyncio.sleep(...)` after each token is the only moment others (and disconnects) get
through. (A bare sleep(0) turned out not to be enough for a client's hang-up to be noticed.)
"""

from __future__ import annotations

import asyncio
import gc

from common.api import EngineLoad
from common.config import ServerConfig
from common.generation import generate_steps
from common.model import load_model
from common.request import Request, log_done


class BruteForceEngine:
    def __init__(self, config: ServerConfig, tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._tasks: set[asyncio.Task] = set()  # strong references until each task ends

    async def submit(self, request: Request) -> None:
        task = asyncio.create_task(self._run(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self._tasks))  # nothing waits: every request runs

    async def _run(self, request: Request) -> None:
        try:
            await self._generate(request)
        except Exception as exc:
            request.fail(exc)
        finally:
            log_done(request)
            gc.collect()  # give the copy of the weights back before the next request loads one

    async def _generate(self, request: Request) -> None:
        lm = load_model(self.config, self.tokenizer)  # blocks the loop: the baseline's cost
        for _ in generate_steps(lm, request):
            await asyncio.sleep(0.001)  # 1 ms per token
