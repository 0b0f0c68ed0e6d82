"""A bounded FIFO request queue in front of one model worker.

HTTP handlers no longer touch the model: they put their request on the queue and wait for its
deltas. One worker task takes requests in arrival order and runs each on a worker thread, one at
a time, so the model never runs two requests at once. Tokens travel back to each request's own
channel (Request._emit hands them from the worker thread to the event loop).

At the bound, `submit` refuses at once with a 429 instead of letting the backlog grow without
limit. That is all step 2 does about overload: no Retry-After, no deadline (step 6 adds them).
A request whose client left while it waited stops counting at once and is dropped when it
reaches the head of the queue, before it costs any model time.

The engine is the one owner of where its requests are: the queue holds the waiting ones, the
engine the one running. Everything else (step 5's gauges, step 6's admission and drain) asks
`load()`; nothing keeps a set of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from common.api import EngineLoad
from common.config import ConfigPart, knob
from common.errors import APIError
from common.generation import generate
from common.model import LoadedModel
from common.request import Request, RequestStatus, log_done

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class QueueConfig(ConfigPart):
    max_queue_size: int = knob(64, "requests waiting for the worker; one more gets a 429")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")


class RequestQueue:
    """Waiting requests in arrival order. Touched on the event loop only."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._waiting: deque[Request] = deque()
        self._arrived = asyncio.Event()

    def live(self) -> list[Request]:
        """The waiting requests whose clients are still there, oldest first."""
        return [r for r in self._waiting if not r.cancelled]

    @property
    def depth(self) -> int:
        return len(self.live())

    def put(self, request: Request) -> None:
        if self.depth >= self.max_size:
            raise APIError(
                f"the request queue is full ({self.max_size} waiting); try again later",
                status=429,
                code="queue_full",
            )
        self._waiting.append(request)
        self._arrived.set()
        log.info("request %s queued depth=%d", request.request_id, self.depth)

    def remove(self, request: Request) -> bool:
        """Take a request out before it runs; False if it is not waiting here."""
        try:
            self._waiting.remove(request)
        except ValueError:
            return False
        return True

    def get_nowait(self) -> Request | None:
        """The next live request, or None when none is waiting; drops the cancelled ones."""
        while self._waiting:
            request = self._waiting.popleft()
            if self._admit(request):
                return request
        return None

    async def get(self) -> Request:
        """Wait for the next live request."""
        while True:
            request = self.get_nowait()
            if request is not None:
                return request
            self._arrived.clear()
            await self._arrived.wait()

    def _admit(self, request: Request) -> bool:
        """On the event loop, as the request leaves the queue: it is running from here on."""
        request.queue_wait_s = time.monotonic() - request.arrival_time
        if request.cancelled:
            request.drop_cancelled()
            log_done(request, queue_wait_s=round(request.queue_wait_s, 4), dropped="queued")
            return False
        request.status = RequestStatus.RUNNING
        return True


class QueueEngine:
    def __init__(self, lm: LoadedModel, queue: RequestQueue) -> None:
        self.lm = lm
        self.queue = queue
        self.running: list[Request] = []  # what the worker has taken, until it gives it back
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="model-worker")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def submit(self, request: Request) -> None:
        self.queue.put(request)

    def load(self) -> EngineLoad:
        waiting = self.queue.live()
        tokens = sum(r.num_prompt_tokens for r in waiting)
        running = sum(1 for r in self.running if not (r.finished or r.cancelled))
        return EngineLoad(len(waiting), tokens, running)

    def expire(self, request: Request, error: APIError) -> bool:
        """Fail a request that is still waiting with `error` and take it out of the queue;
        False when it has already left the queue (it runs, or ran)."""
        if not self.queue.remove(request):
            return False
        request.fail(error)
        return True

    async def _run(self) -> None:
        while True:
            request = await self.queue.get()
            wait = round(request.queue_wait_s or 0.0, 4)
            await self.run([request], generate, self.lm, request, queue_wait_s=wait)

    async def run(self, requests: list[Request], work, *args, **kwargs) -> None:
        """Run `work(*args)` on a worker thread; `requests` count as running meanwhile."""
        self.running = requests
        try:
            await asyncio.to_thread(work, *args, **kwargs)
        finally:
            self.running = []
