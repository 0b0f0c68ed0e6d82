"""The request: the one noun every step passes around.

A Request is made on the event loop by an HTTP handler, run by some model worker (the loop
itself in step 0, a thread from step 1 on), and streams Deltas back through its own channel.
`append_token` is the single place where a sampled token becomes text, stop sequences and
max_tokens are checked, and the finish reason is decided; every engine calls it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.detokenize import IncrementalDetokenizer, StopMatcher
from common.sampling import Sampler, SamplingParams

_ids = itertools.count()
log = logging.getLogger("gateway")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Delta:
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    error: BaseException | None = None


class Request:
    def __init__(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        tokenizer,
        eos_token_ids: set[int],
        request_id: str | None = None,
    ) -> None:
        self.request_id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.sampler = Sampler(sampling)
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.output_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.token_times: list[float] = []  # monotonic time of each output token
        self.queue_wait_s: float | None = None  # set by engines that queue
        self.cached_prompt_tokens = 0  # prompt tokens whose KV came from a prefix cache
        self.headers: dict[str, str] = {}  # the client's HTTP headers, lower-case names
        self.response_headers: dict[str, str] = {}  # engines may add headers to the answer
        self._done_callbacks: list = []
        self.finish_time: float | None = None
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(sampling.stop)
        self._cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._channel: asyncio.Queue[Delta] = asyncio.Queue()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ------------------------------------------------------------ called by the model worker

    def append_token(self, token_id: int) -> bool:
        """Record one sampled token, emit its text. Returns True once the request is finished."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        self.output_ids.append(token_id)
        if token_id in self.eos_token_ids:
            return self._finish("stop", self._drain()[0])
        text, hit_stop = self._stops.push(self._detok.push(token_id))
        if hit_stop:
            return self._finish("stop", text)
        if len(self.output_ids) >= self.max_tokens:
            rest, hit_stop = self._drain()
            return self._finish("stop" if hit_stop else "length", text + rest)
        if text:
            self._emit(Delta(text))
        return False

    def _drain(self) -> tuple[str, bool]:
        """At the end: what is still held back (unfinished bytes, a partial stop match)."""
        text, hit_stop = self._stops.push(self._detok.flush())
        return (text, True) if hit_stop else (text + self._stops.flush(), False)

    def finish_with(self, text: str, output_ids: list[int], finish_reason: str) -> None:
        """Complete at once with a known answer (a cached one) instead of generating it."""
        self.output_ids = list(output_ids)
        self.first_token_time = time.monotonic()
        self._finish(finish_reason, text)

    def add_done_callback(self, callback) -> None:
        """Call `callback(request)` on the event loop once the request has finished normally."""
        self._done_callbacks.append(callback)

    def fail(self, error: BaseException) -> None:
        self.status = RequestStatus.FINISHED
        self._emit(Delta("", error=error))

    def _finish(self, reason: str, text: str) -> bool:
        self.status, self.finish_reason = RequestStatus.FINISHED, reason
        self.finish_time = time.monotonic()
        # Callbacks are queued before the last delta: they run before the client can get its
        # answer, so nothing it does next can overtake them.
        self.text += text
        for callback in self._done_callbacks:
            self._loop.call_soon_threadsafe(callback, self)
        self._loop.call_soon_threadsafe(self._channel.put_nowait, Delta(text, finish_reason=reason))
        return True

    def _emit(self, delta: Delta) -> None:
        self.text += delta.text
        # Safe from any thread: the channel is only touched on the event loop.
        self._loop.call_soon_threadsafe(self._channel.put_nowait, delta)

    # ------------------------------------------------------------ called on the event loop

    def cancel(self) -> None:
        """The client went away: the worker stops this request at its next token."""
        if not self.finished:
            self.status = RequestStatus.CANCELLED
            self.finish_time = time.monotonic()
        self._cancel.set()

    async def deltas(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self._channel.get()
            if delta.error is not None:
                raise delta.error
            yield delta
            if delta.finish_reason is not None:
                return


def log_done(request: Request, **extra: object) -> None:
    """One line per request, written by the worker once it has let go of the request."""
    now = time.monotonic()
    ttft = request.first_token_time - request.arrival_time if request.first_token_time else None
    fields = {
        "status": request.status.value,
        "finish_reason": request.finish_reason,
        "prompt_tokens": request.num_prompt_tokens,
        "cached_prompt_tokens": request.cached_prompt_tokens,
        "output_tokens": request.num_output_tokens,
        "ttft_s": round(ttft, 4) if ttft is not None else None,
        "e2e_s": round(now - request.arrival_time, 4),
        **extra,
    }
    log.info(
        "request %s done %s", request.request_id, " ".join(f"{k}={v}" for k, v in fields.items())
    )
