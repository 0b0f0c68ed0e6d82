"""A bounded FIFO request queue in front of one model worker.

HTTP handlers no longer touch the model: they put their request on the queue and wait for its
deltas. One worker task takes requests in arrival order and runs each on a worker thread, one at
a time, so the model never runs two requests at once. Tokens travel back to each request's own
channel (Request._emit hands them from the worker thread to the event loop).

At the bound, `submit` refuses at once with a 429 instead of letting the backlog grow without
limit. That is all step 2 does about overload: no Retry-After, no deadline (step 6 adds them).
A request whose client left while it waited is dropped when it reaches the head of the queue,
before it costs any model time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.errors import APIError
from common.generation import generate
from common.model import LoadedModel
from common.request import Request, RequestStatus, log_done

log = logging.getLogger("gateway")


class RequestQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._queue: asyncio.Queue[Request] = asyncio.Queue(maxsize=max_size)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def put(self, request: Request) -> None:
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise APIError(
                f"the request queue is full ({self.max_size} waiting); try again later",
                status=429,
                code="queue_full",
            ) from None
        log.info("request %s queued depth=%d", request.request_id, self.depth)

    def get_nowait(self) -> Request | None:
        """The next live request, or None when none is waiting; drops the cancelled ones."""
        while not self._queue.empty():
            request = self._queue.get_nowait()
            if self._admit(request):
                return request
        return None

    async def get(self) -> Request:
        """Wait for the next live request."""
        while True:
            request = await self._queue.get()
            if self._admit(request):
                return request

    def _admit(self, request: Request) -> bool:
        """On the event loop, as the request leaves the queue: it is running from here on."""
        request.queue_wait_s = time.monotonic() - request.arrival_time
        if request.cancelled:
            log_done(request, queue_wait_s=round(request.queue_wait_s, 4), dropped="queued")
            return False
        request.status = RequestStatus.RUNNING
        return True


class QueueEngine:
    def __init__(self, lm: LoadedModel, queue: RequestQueue) -> None:
        self.lm = lm
        self.queue = queue
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="model-worker")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def submit(self, request: Request) -> None:
        self.queue.put(request)

    async def _run(self) -> None:
        while True:
            request = await self.queue.get()
            wait = round(request.queue_wait_s or 0.0, 4)
            await asyncio.to_thread(generate, self.lm, request, queue_wait_s=wait)
