"""Liveness, readiness, graceful drain on SIGTERM, and an optional API key.

- GET /health/live: the process answers (200 as soon as it serves HTTP at all).
- GET /health/ready: 200 only when the model is loaded, the server is not draining, and (unless
  `ready_when_saturated`) the waiting queue is not full; a load balancer sends traffic elsewhere
  on 503. GET /health stays as before (liveness plus "model loaded").
- SIGTERM: stop admitting (new requests get 503), let in-flight requests finish for up to
  `drain_timeout_s`, then exit. A second SIGTERM or SIGINT exits at once.
- With `api_key` set, the /v1 routes want `Authorization: Bearer <key>` (401 otherwise).
"""

from __future__ import annotations

import hmac
import logging
import time

import uvicorn
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse

from common.errors import APIError, error_response

log = logging.getLogger("gateway")


class Lifecycle:
    def __init__(self, drain_timeout_s: float) -> None:
        self.drain_timeout_s = drain_timeout_s
        self.admission = None  # set by the lifespan once the model is loaded
        self.drain_deadline: float | None = None

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def start_drain(self) -> None:
        log.warning("draining: refusing new requests, finishing %d in flight", self.in_flight())
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        if self.admission is not None:
            self.admission.draining = True

    def in_flight(self) -> int:
        return len(self.admission.live) if self.admission is not None else 0

    def drained(self, open_responses: int) -> bool:
        """Nothing admitted is unfinished and no response is still being written."""
        if not self.draining:
            return False
        idle = self.in_flight() == 0 and open_responses == 0
        return idle or time.monotonic() >= self.drain_deadline


class GracefulServer(uvicorn.Server):
    """uvicorn, except the first SIGTERM drains instead of closing the listening socket."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig, frame) -> None:
        if self.lifecycle.draining or self.lifecycle.admission is None:
            return super().handle_exit(sig, frame)
        self.lifecycle.start_drain()

    async def on_tick(self, counter: int) -> bool:
        # A request leaves `in_flight` just before its response is sent: wait for that too.
        if self.lifecycle.drained(open_responses=len(self.server_state.tasks)):
            log.warning("drained (%d still in flight): exiting", self.lifecycle.in_flight())
            self.should_exit = True
        return await super().on_tick(counter)


async def live(http: HTTPRequest) -> JSONResponse:
    return JSONResponse({"status": "alive"})


def readiness(lifecycle: Lifecycle, ready_when_saturated: bool):
    async def ready(http: HTTPRequest) -> JSONResponse:
        admission = lifecycle.admission
        reason = (
            "loading"
            if admission is None
            else "draining"
            if lifecycle.draining
            else "saturated"
            if admission.saturated() and not ready_when_saturated
            else None
        )
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    return ready


class ApiKeyMiddleware:
    """Bearer-token check on /v1/*; health and metrics stay open for probes and scrapers."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError("invalid or missing API key", 401, code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)
