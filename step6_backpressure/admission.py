"""Admission control: decide at the door, before any expensive work, whether a request gets in.

Step 2's queue already refused work at its bound, but too late and too bluntly: no hint of when
to come back, no account of how much prompt work is waiting, no deadline, and cancelled requests
kept their place until they reached the head. Here:

- a request is admitted only while the waiting requests, and their prompt tokens, stay under
  their bounds; otherwise 429 at once, with a Retry-After computed from the observed drain rate;
- while the server drains (SIGTERM) every new request gets 503;
- an admitted request that is still waiting when its queue deadline passes gets a 503 instead of
  a late answer, and leaves the queue;
- a request whose client went away stops counting against the bounds at once;
- inputs are bounded: prompt tokens and max_tokens (400), on top of common's validation.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from starlette.datastructures import Headers

from common.api import Observer, Outcome, Serving
from common.config import ConfigPart, knob
from common.errors import APIError, error_response
from common.request import Request, RequestStatus


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


class AdmissionController(Observer):
    """Counts what is admitted and not finished; rejects what does not fit; sets deadlines."""

    def __init__(self, limits: AdmissionConfig, drain_window_s: float = 30.0) -> None:
        self.limits = limits
        self.live: set[Request] = set()
        self.draining = False
        self.reasons: Counter[str] = Counter()  # rejections, timeouts and cancellations
        self._finished: deque[float] = deque()  # completion times inside the drain window
        self._window_s = drain_window_s

    # ------------------------------------------------------------ counts

    def waiting(self) -> list[Request]:
        return [r for r in self.live if r.status == RequestStatus.WAITING and not r.cancelled]

    def saturated(self) -> bool:
        return len(self.waiting()) >= self.limits.max_waiting_requests

    def drain_rate(self) -> float:
        """Requests finished per second over the last window."""
        now = time.monotonic()
        while self._finished and self._finished[0] < now - self._window_s:
            self._finished.popleft()
        return len(self._finished) / self._window_s

    def retry_after_s(self) -> int:
        rate = self.drain_rate()
        backlog = len(self.waiting()) + 1
        return 1 if rate == 0 else min(60, max(1, math.ceil(backlog / rate)))

    # ------------------------------------------------------------ the door

    def admit(self, request: Request) -> None:
        if self.draining:
            self._reject("draining", 503, "the server is shutting down; retry elsewhere")
        waiting = self.waiting()
        tokens = sum(r.num_prompt_tokens for r in waiting) + request.num_prompt_tokens
        if len(waiting) >= self.limits.max_waiting_requests:
            self._reject("queue_full", 429, f"{len(waiting)} requests are already waiting")
        if tokens > self.limits.max_waiting_tokens:
            self._reject("queue_tokens", 429, f"{tokens} prompt tokens would be waiting")
        self.live.add(request)
        self._set_deadline(request)

    def _reject(self, reason: str, status: int, message: str) -> None:
        self.reasons[f"rejected:{reason}"] += 1
        headers = {"Retry-After": str(self.retry_after_s())}
        raise APIError(f"{message}; try again later", status, code=reason, headers=headers)

    def _set_deadline(self, request: Request) -> None:
        timeout = self.limits.queue_timeout_s
        if request.queue_timeout_s is not None:  # the client's X-Queue-Timeout, within bounds
            timeout = min(request.queue_timeout_s, self.limits.max_queue_timeout_s)
        asyncio.get_running_loop().call_later(timeout, self._expire, request, timeout)

    def _expire(self, request: Request, timeout: float) -> None:
        """On the event loop, which also owns the status change to RUNNING: no race."""
        started = request.first_token_time is not None  # (a preempted request waits again)
        if request.status != RequestStatus.WAITING or request.cancelled or started:
            return
        self.reasons["timeout:queue"] += 1
        error = APIError(
            f"waited {timeout:g} s in the queue without starting; try again later",
            503,
            code="queue_timeout",
            headers={"Retry-After": str(self.retry_after_s())},
        )
        request.fail(error)
        request.cancel()  # the worker drops it when it reaches the head of the queue

    # ------------------------------------------------------------ the way out

    def on_end(self, http, outcome: Outcome, request: Request | None) -> None:
        if request is None or request not in self.live:
            return
        self.live.discard(request)
        if outcome is Outcome.CANCELLED:
            stage = "queued" if request.first_token_time is None else "running"
            self.reasons[f"cancelled:{stage}"] += 1
        elif outcome is Outcome.SUCCESS:
            self._finished.append(time.monotonic())


class AdmittingEngine:
    """Puts the admission check in front of an engine's submit."""

    def __init__(self, inner, admission: AdmissionController) -> None:
        self.inner, self.admission = inner, admission

    def start(self) -> None:
        self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def submit(self, request: Request) -> None:
        self.admission.admit(request)
        try:
            await self.inner.submit(request)
        except APIError:
            self.admission.live.discard(request)
            raise


@dataclass
class LimitedServing(Serving):
    """Serving with bounds on prompt length and max_tokens, checked before admission."""

    limits: AdmissionConfig = field(default_factory=AdmissionConfig)

    def make_request(self, prompt_ids, params, rid, prompt_param: str) -> Request:
        limits = self.limits
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise APIError(
                f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                f"{limits.max_prompt_tokens}",
                param=prompt_param,
                code="prompt_too_long",
            )
        max_tokens = params.max_new_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens_limit:
            raise APIError(
                f"max_tokens is at most {limits.max_tokens_limit} on this server",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        return super().make_request(prompt_ids, params, rid, prompt_param)


class BodyLimitMiddleware:
    """413 for a body past `limit` bytes: at once when Content-Length says so, else as soon as
    more than that has arrived (a chunked body), before it is all read."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _declared_length(scope) > self.limit:
            error = APIError(f"request body over {self.limit} bytes", 413, code="body_too_large")
            response = error_response(error)
            response.headers["connection"] = "close"  # the unread body is not waited for
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(f"request body over {self.limit} bytes", 413, code="body_too_large")
            return message

        await self.app(scope, counted_receive if scope["type"] == "http" else receive, send)


def _declared_length(scope) -> int:
    raw = Headers(scope=scope).get("content-length", "")
    return int(raw) if raw.isdigit() else 0  # a malformed header is uvicorn's to refuse


class AdmissionCollector:
    """gateway_admission_events_total{reason}: rejections, timeouts, cancellations."""

    def __init__(self, admission: AdmissionController) -> None:
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
