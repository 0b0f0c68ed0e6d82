"""The request: the one noun every step passes around, and the channel its answer travels on.

A Request is what the API asked for and everything that happens to it: its token ids (prompt,
then output), its status, its timings. It owns them: engines read and advance them through its
methods, and nothing else keeps a copy. It knows nothing of HTTP or of event loops; the API
(common/api.py) turns headers into its typed fields and gives it a DeltaChannel to answer on.

Its status has one writer: the engine that holds it (its queue or scheduler moves it between
WAITING and RUNNING, and it ends through `append_token`, `fail` or, on a cache hit before any
engine, `finish_with`). A client that leaves does not touch the status: `cancel()` only raises
the request's one cancellation flag, which the engine reads, from whatever thread it runs on,
before its next token; the engine then drops the request and records it as CANCELLED.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from common.detokenize import IncrementalDetokenizer, StopMatcher
from common.sampling import Sampler, SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from common.grammar import Constraint

_ids = itertools.count()
log = logging.getLogger("gateway")


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not in a forward pass yet (or preempted, and waiting again)
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"  # dropped by its engine after the client left


@dataclass(frozen=True)
class Delta:
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    error: BaseException | None = None
    index: int = 0  # which of the request's choices (n > 1) it belongs to
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of the tokens since the last


class DeltaChannel:
    """Carries one request's deltas from the thread that generates to the event loop that
    answers. `send` is safe from any thread; `receive` runs on the loop it was made on."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()

    def send(self, delta: Delta) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def call_soon(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` on the loop, in order with the deltas sent."""
        self._loop.call_soon_threadsafe(callback, *args)

    async def receive(self) -> Delta:
        return await self._queue.get()


class Request:
    def __init__(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        tokenizer,
        eos_token_ids: set[int],
        request_id: str | None = None,
        channel: DeltaChannel | None = None,
        constraint: Constraint | None = None,
        index: int = 0,
    ) -> None:
        self.request_id = request_id or f"req-{next(_ids)}"
        self.token_ids = list(prompt_ids)  # the prompt, then every sampled token
        self.num_prompt_tokens = len(prompt_ids)
        self.sampling = sampling
        self.sampler = Sampler(sampling, constraint)
        self.index = index  # this choice's place among the request's n
        self.siblings: list[Request] = [self]  # every choice of the API request, in order
        self.logprobs: list[TokenLogprobs] = []  # per output token, when asked for
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.text = ""  # everything emitted so far
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        # From the client's headers (common/api.py), for the steps that honour them.
        self.skip_response_cache = False  # Cache-Control: no-cache / no-store
        self.queue_timeout_s: float | None = None  # X-Queue-Timeout
        self.response_cache: str | None = None  # "hit" | "miss" once a response cache looked
        # Timings on the monotonic clock, and what the engine reports back.
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.token_times: list[float] = []  # when each output token was sampled
        self.finish_time: float | None = None
        self.queue_wait_s: float | None = None  # set by engines that queue
        self.cached_prompt_tokens = 0  # prompt tokens whose KV came from a prefix cache
        self.channel = channel
        self._done_callbacks: list[Callable[[Request], object]] = []
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(sampling.stop)
        self._cancel = threading.Event()
        self._unsent_logprobs = 0  # entries of `logprobs` not yet on a delta

    @property
    def trace_id(self) -> str:
        """The request id, and the choice for n > 1: how logs and the timeline name it."""
        return self.request_id if len(self.siblings) == 1 else f"{self.request_id}/{self.index}"

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.CANCELLED)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # ------------------------------------------------------------ called by the model worker

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this request's logits ([vocab]), with its own sampler."""
        return self.sampler.sample(logits, self.output_ids if self.sampling.penalized else [])

    def append_token(self, token_id: int) -> bool:
        """Record one sampled token, emit its text. Returns True once the request is finished."""
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        self.token_ids.append(token_id)
        if token_id in self.eos_token_ids:
            return self._finish("stop", self._drain()[0])
        if self.sampler.last_logprobs is not None:
            self.logprobs.append(self.sampler.last_logprobs)
        text, hit_stop = self._stops.push(self._detok.push(token_id))
        if hit_stop:
            return self._finish("stop", text)
        grammar = self.sampler.constraint
        if grammar is not None and grammar.complete_after(self.num_output_tokens):
            # The JSON is complete: nothing may follow.
            return self._finish("stop", text + self._drain()[0])
        if self.num_output_tokens >= self.max_tokens:
            rest, hit_stop = self._drain()
            return self._finish("stop" if hit_stop else "length", text + rest)
        if text:
            self._emit(text)
        return False

    def _drain(self) -> tuple[str, bool]:
        """At the end: what is still held back (unfinished bytes, a partial stop match)."""
        text, hit_stop = self._stops.push(self._detok.flush())
        return (text, True) if hit_stop else (text + self._stops.flush(), False)

    def finish_with(self, text: str, output_ids: list[int], finish_reason: str) -> None:
        """Complete at once with a known answer (a cached one) instead of generating it."""
        del self.token_ids[self.num_prompt_tokens :]
        self.token_ids += output_ids
        self.first_token_time = time.monotonic()
        self._finish(finish_reason, text)

    def add_done_callback(self, callback: Callable[[Request], object]) -> None:
        """Call `callback(request)` (on the channel's loop) once it has finished normally."""
        self._done_callbacks.append(callback)

    def drop_cancelled(self) -> None:
        """Called by the engine as it lets go of a request whose client has left."""
        self.status = RequestStatus.CANCELLED
        self.finish_time = time.monotonic()

    def fail(self, error: BaseException) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_time = time.monotonic()
        self._send(Delta("", error=error, index=self.index))

    def _finish(self, reason: str, text: str) -> bool:
        self.status, self.finish_reason = RequestStatus.FINISHED, reason
        self.finish_time = time.monotonic()
        self.text += text
        # Callbacks go before the last delta: they run before the client can get its answer,
        # so nothing it does next can overtake them.
        for callback in self._done_callbacks:
            if self.channel is None:
                callback(self)
            else:
                self.channel.call_soon(callback, self)
        self._send(Delta(text, reason, index=self.index, logprobs=self._take_logprobs()))
        return True

    def _emit(self, text: str) -> None:
        self.text += text
        self._send(Delta(text, index=self.index, logprobs=self._take_logprobs()))

    def _take_logprobs(self) -> list[TokenLogprobs]:
        """The logprobs of the tokens whose text goes out now (text held back waits, and so
        do its tokens' logprobs)."""
        fresh = self.logprobs[self._unsent_logprobs :]
        self._unsent_logprobs = len(self.logprobs)
        return fresh

    def _send(self, delta: Delta) -> None:
        if self.channel is not None:
            self.channel.send(delta)

    # ------------------------------------------------------------ called on the event loop

    def cancel(self) -> None:
        """The client went away: the engine stops this request at its next token (a no-op
        once it has finished). Safe from any thread."""
        self._cancel.set()

    async def deltas(self) -> AsyncIterator[Delta]:
        if self.channel is None:
            raise RuntimeError("this request has no channel to answer on")
        while True:
            delta = await self.channel.receive()
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
