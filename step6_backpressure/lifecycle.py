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
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from common.app import program_name, setup_logging
from common.config import ConfigPart, knob
from common.errors import APIError, error_response

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class LifecycleConfig(ConfigPart):
    ready_when_saturated: bool = knob(False, "stay ready (200) while the waiting queue is full")
    drain_timeout_s: float = knob(30.0, "after SIGTERM, how long in-flight requests may finish")
    api_key: str = knob("", "require `Authorization: Bearer <key>` on /v1 (empty: no key)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")


class Door(Protocol):
    """What the lifecycle asks of the server's door (step 6's AdmissionController)."""

    def in_flight(self) -> int: ...

    def saturated(self) -> bool: ...


class Lifecycle:
    """Readiness and drain state of one server, shared by its routes and its uvicorn.Server.
    It owns `draining`; the door it watches while the server runs answers the counts."""

    def __init__(self, config: LifecycleConfig) -> None:
        self.config = config
        self.drain_timeout_s = config.drain_timeout_s
        self.drain_deadline: float | None = None
        self._door: Door | None = None  # set while the server is serving (`serving`)

    @asynccontextmanager
    async def serving(self, door: Door) -> AsyncIterator[None]:
        """The lifespan's body: ready (unless saturated) and drainable from here to its end."""
        self._door = door
        try:
            yield
        finally:
            self._door = None

    @property
    def loaded(self) -> bool:
        return self._door is not None

    @property
    def routes(self) -> list[Route]:
        ready = readiness(self, self.config.ready_when_saturated)
        return [
            Route("/health/live", live, methods=["GET"]),
            Route("/health/ready", ready, methods=["GET"]),
        ]

    @property
    def middleware(self) -> list[Middleware]:
        api_key = self.config.api_key
        return [Middleware(ApiKeyMiddleware, api_key=api_key)] if api_key else []

    @property
    def draining(self) -> bool:
        return self.drain_deadline is not None

    def start_drain(self) -> None:
        log.warning("draining: refusing new requests, finishing %d in flight", self.in_flight())
        self.drain_deadline = time.monotonic() + self.drain_timeout_s

    def in_flight(self) -> int:
        return self._door.in_flight() if self._door is not None else 0

    def saturated(self) -> bool:
        return self._door is not None and self._door.saturated()

    def drained(self, open_responses: int) -> bool:
        """Nothing admitted is unfinished and no response is still being written."""
        if self.drain_deadline is None:  # not draining
            return False
        idle = self.in_flight() == 0 and open_responses == 0
        return idle or time.monotonic() >= self.drain_deadline


class GracefulServer(uvicorn.Server):
    """uvicorn, except the first SIGTERM drains instead of closing the listening socket."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig, frame) -> None:
        if self.lifecycle.draining or not self.lifecycle.loaded:
            return super().handle_exit(sig, frame)
        self.lifecycle.start_drain()

    async def on_tick(self, counter: int) -> bool:
        # A request leaves the engine just before its response is sent: wait for that too.
        if self.lifecycle.drained(open_responses=len(self.server_state.tasks)):
            log.warning("drained (%d still in flight): exiting", self.lifecycle.in_flight())
            self.should_exit = True
        return await super().on_tick(counter)


async def live(http: HTTPRequest) -> JSONResponse:
    return JSONResponse({"status": "alive"})


def readiness(lifecycle: Lifecycle, ready_when_saturated: bool):
    async def ready(http: HTTPRequest) -> JSONResponse:
        reason = (
            "loading"
            if not lifecycle.loaded
            else "draining"
            if lifecycle.draining
            else "saturated"
            if lifecycle.saturated() and not ready_when_saturated
            else None
        )
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    return ready


PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/debug/")


class ApiKeyMiddleware:
    """Bearer-token check on the API (/v1/*, /tokenize, /detokenize) and /debug/*; health and
    metrics stay open for probes and scrapers. The scheme is case-insensitive (RFC 9110:
    `bearer`, `Bearer` and `BEARER` are the same). GET /debug/ also takes the key as
    `?access_token=` (RFC 6750), for pages opened in a browser."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not scheme:  # a browser opening a debug page cannot send a header
                scheme, token = b"bearer", _query_token(scope)
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token, self.expected)):
                error = APIError("invalid or missing API key", 401, code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _query_token(scope) -> bytes:
    """RFC 6750's `access_token` query parameter, taken on GET /debug/ only (a page such as
    /debug/engine, opened in a browser); the API proper wants the header."""
    if scope["method"] != "GET" or not scope["path"].startswith("/debug/"):
        return b""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("access_token", [""])[-1].encode()


def serve_gracefully(build_app: Callable[[Any, Lifecycle], Starlette], config_class: Any) -> None:
    """Like common.app.serve, but the first SIGTERM drains (GracefulServer). `config_class`: a
    ServerConfig that has LifecycleConfig's knobs."""
    config = config_class.load(sys.argv[1:], prog=program_name(build_app))
    setup_logging(config.log_level)
    lifecycle = Lifecycle(config)
    uv_config = uvicorn.Config(
        build_app(config, lifecycle),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=5,
    )
    GracefulServer(uv_config, lifecycle).run()
