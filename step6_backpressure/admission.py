"""Admission control: decide at the door, before any expensive work, whether a request gets in.

Step 2's queue already refused work at its bound, but too late and too bluntly: no hint of when
to come back, no account of how much prompt work is waiting, no deadline, and cancelled requests
kept their place until they reached the head. Here:

- a request is admitted only while the waiting requests, and their prompt tokens, stay under
  their bounds; otherwise 429 at once, with a Retry-After computed from the observed drain rate;
- while the server drains (SIGTERM, step 6's lifecycle) every new request gets 503;
- an admitted request that is still waiting when its queue deadline passes gets a 503 instead of
  a late answer, and leaves the queue;
- a request whose client went away stops counting against the bounds at once;
- inputs are bounded: prompt tokens and max_tokens (400), on top of common's validation.

The door keeps no list of its own of what is inside: the engine owns its waiting and running
requests, and the door asks it (`load()`); a deadline asks the engine to take out a request that
has not started (`expire()`). The lifecycle owns whether the server is draining.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import CounterMetricFamily
from starlette.datastructures import Headers

from common.api import Engine, Observer, Outcome, Serving
from common.config import ConfigPart, knob
from common.errors import APIError, error_response
from common.request import Request


@dataclass(frozen=True)
class AdmissionConfig(ConfigPart):
    max_waiting_requests: int = knob(64, "admitted requests not yet running; one more gets a 429")
    max_waiting_tokens: int = knob(32768, "prompt tokens of those; more gets a 429")
    queue_timeout_s: float = knob(30.0, "a request that has not started by then gets a 503")
    max_queue_timeout_s: float = knob(120.0, "the longest deadline X-Queue-Timeout may ask for")
    max_prompt_tokens: int = knob(4096, "longer prompts get a 400")
    max_tokens_limit: int = knob(1024, "the largest max_tokens accepted (400 above)")
    max_body_bytes: int = knob(1 << 20, "larger request bodies get a 413")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.max_waiting_requests, self.max_waiting_tokens, self.max_body_bytes) < 1:
            raise ValueError("waiting bounds and max_body_bytes must be at least 1")
        if min(self.queue_timeout_s, self.max_queue_timeout_s) <= 0:
            raise ValueError("queue timeouts must be positive")


class QueueingEngine(Engine, Protocol):
    """What the door needs from an engine with a waiting place."""

    def expire(self, request: Request, error: APIError) -> bool:
        """Fail a request that has not started with `error` and take it out; False when it
        has started."""
        ...


class Draining(Protocol):
    @property
    def draining(self) -> bool: ...


class AdmissionController(Observer):
    """Rejects what does not fit, sets deadlines, counts why; asks the engine what is inside."""

    def __init__(
        self,
        limits: AdmissionConfig,
        engine: QueueingEngine,
        lifecycle: Draining,
        drain_window_s: float = 30.0,
    ) -> None:
        self.limits, self.engine, self.lifecycle = limits, engine, lifecycle
        self.reasons: Counter[str] = Counter()  # rejections, timeouts and cancellations
        self._finished: deque[float] = deque()  # completion times inside the drain window
        self._window_s = drain_window_s

    # ------------------------------------------------------------ counts, asked of the engine

    def in_flight(self) -> int:
        return self.engine.load().in_flight

    def saturated(self) -> bool:
        return self.engine.load().waiting >= self.limits.max_waiting_requests

    def drain_rate(self) -> float:
        """Requests finished per second over the last window."""
        now = time.monotonic()
        while self._finished and self._finished[0] < now - self._window_s:
            self._finished.popleft()
        return len(self._finished) / self._window_s

    def retry_after_s(self) -> int:
        rate = self.drain_rate()
        backlog = self.engine.load().waiting + 1
        return 1 if rate == 0 else min(60, max(1, math.ceil(backlog / rate)))

    # ------------------------------------------------------------ the door

    def admit(self, request: Request) -> None:
        """Raises the 503 or 429 that keeps `request` out; else sets its queue deadline."""
        if self.lifecycle.draining:
            self.reject("draining", 503, "the server is shutting down; retry elsewhere")
        load = self.engine.load()
        tokens = load.waiting_tokens + request.num_prompt_tokens
        if load.waiting >= self.limits.max_waiting_requests:
            self.reject("queue_full", 429, f"{load.waiting} requests are already waiting")
        if tokens > self.limits.max_waiting_tokens:
            self.reject("queue_tokens", 429, f"{tokens} prompt tokens would be waiting")
        self._set_deadline(request)

    def reject(self, reason: str, status: int, message: str) -> None:
        self.reasons[f"rejected:{reason}"] += 1
        headers = {"Retry-After": str(self.retry_after_s())}
        raise APIError(f"{message}; try again later", status, code=reason, headers=headers)

    def _set_deadline(self, request: Request) -> None:
        timeout = self.limits.queue_timeout_s
        if request.queue_timeout_s is not None:  # the client's X-Queue-Timeout, within bounds
            timeout = min(request.queue_timeout_s, self.limits.max_queue_timeout_s)
        asyncio.get_running_loop().call_later(timeout, self._expire, request, timeout)

    def _expire(self, request: Request, timeout: float) -> None:
        """On the event loop, as the engine's bookkeeping is: the engine takes the request out
        if it has not started, and only then is the timeout counted."""
        error = APIError(
            f"waited {timeout:g} s in the queue without starting; try again later",
            503,
            code="queue_timeout",
            headers={"Retry-After": str(self.retry_after_s())},
        )
        if self.engine.expire(request, error):
            self.reasons["timeout:queue"] += 1

    # ------------------------------------------------------------ the way out

    def on_end(self, http, outcome: Outcome, request: Request | None) -> None:
        if request is None or request.response_cache == "hit":  # never came to the door
            return
        if outcome is Outcome.CANCELLED:
            stage = "queued" if request.first_token_time is None else "running"
            self.reasons[f"cancelled:{stage}"] += 1
        elif outcome is Outcome.SUCCESS:
            self._finished.append(time.monotonic())


@dataclass
class LimitedServing(Serving):
    """Serving with bounds on prompt length and max_tokens, checked before admission."""

    limits: AdmissionConfig = field(default_factory=AdmissionConfig)

    def check_prompt(self, num_tokens: int, param: str, at_least: bool = False) -> None:
        limit = self.limits.max_prompt_tokens
        if num_tokens > limit:
            some = "at least " if at_least else ""
            raise APIError(
                f"the prompt has {some}{num_tokens} tokens; this server takes at most {limit}",
                param=param,
                code="prompt_too_long",
            )
        super().check_prompt(num_tokens, param, at_least)

    def make_request(self, prompt_ids, params, rid, prompt_param: str, **choice) -> Request:
        max_tokens = params.max_new_tokens
        if max_tokens is not None and max_tokens > self.limits.max_tokens_limit:
            raise APIError(
                f"max_tokens is at most {self.limits.max_tokens_limit} on this server",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        return super().make_request(prompt_ids, params, rid, prompt_param, **choice)


class BodyLimitMiddleware:
    """413 for a body past `limit` bytes, and the connection closed: at once from the headers
    when Content-Length declares more, before any of the body is read; as soon as more than
    that has arrived when the body is chunked.

    Nothing of the rest is read: the answer is written before the close, and a client still
    sending finds it in its receive buffer (its next write fails, the bytes already received
    stay readable; httpx reads the response after a failed write). Reading the rest first
    would let a client hold the answer back for as long as it takes to send, or not send."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _declared_length(scope) > self.limit:
            return await self._refuse(scope, receive, send)
        seen, over = 0, False

        async def counted_receive():
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise self._error()
            return message

        async def closing_send(message) -> None:
            if over and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        await self.app(scope, counted_receive, closing_send)

    def _error(self) -> APIError:
        return APIError(f"request body over {self.limit} bytes", 413, code="body_too_large")

    async def _refuse(self, scope, receive, send) -> None:
        response = error_response(self._error())
        response.headers["connection"] = "close"
        await response(scope, receive, send)


CLOSE = (b"connection", b"close")


def _declared_length(scope) -> int:
    raw = Headers(scope=scope).get("content-length", "")
    return int(raw) if raw.isdigit() else 0  # a malformed header is uvicorn's to refuse


class Reasons(Protocol):
    reasons: Counter[str]


class AdmissionCollector:
    """gateway_admission_events_total{reason}: rejections, timeouts, cancellations."""

    def __init__(self, admission: Reasons) -> None:
        self.admission = admission

    def collect(self):
        family = CounterMetricFamily(
            "gateway_admission_events",
            "Rejections, timeouts and cancellations, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.admission.reasons.items()):
            family.add_metric([reason], count)
        yield family
