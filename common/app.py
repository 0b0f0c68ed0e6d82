"""The starlette app factory and the `python -m stepN_name` entry point every step uses."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.api import ROUTES
from common.config import ServerConfig
from common.errors import EXCEPTION_HANDLERS, APIError, error_response

log = logging.getLogger("gateway")


def create_app(lifespan, extra_routes: list | None = None, middleware=None) -> Starlette:
    """The OpenAI routes plus a step's own, with OpenAI-shaped errors for every failure."""
    return Starlette(
        routes=[*ROUTES, *(extra_routes or [])],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=frozen_after_startup(lifespan),
        middleware=[*(middleware or []), Middleware(ErrorBoundary)],  # the boundary innermost
    )


def frozen_after_startup(lifespan):
    """The step's lifespan, and once it has started everything, gc.freeze(): what start-up
    made (the model's modules, the tokenizer's vocabulary, ~400,000 objects) lives as long as
    the server, and the collector stops scanning it. Unfrozen, each full collection took
    0.17-0.28 s with the GIL held, and any burst of requests set one off: every stream stopped
    that long (bench/stall.py). Frozen, 6-15 ms."""

    @asynccontextmanager
    async def lifespan_then_freeze(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(app):
            gc.collect()
            gc.freeze()
            yield

    return lifespan_then_freeze


class ErrorBoundary:
    """The one place an unexpected exception becomes an answer: an OpenAI-shaped 500 with
    `Connection: close` (who knows what state the connection is in), logged with the request id.
    It sits inside the step's middleware, so the request id is known. (Starlette's handler for
    `Exception` answers, then re-raises, and uvicorn drops the connection without a word.) A
    fault after a response has started, in a stream, is reported in-band by the stream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            rid = Headers(scope=scope).get("x-request-id")
            log.exception("internal error on %s, request id %s", scope.get("path"), rid)
            if not started:
                error = APIError("internal server error", 500, code="internal_error")
                response = error_response(error)
                response.headers["connection"] = "close"
                await response(scope, receive, send)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Probes and scrapes come every few seconds: their access lines are debug, not info, and
    # so is httpx's line per request (the router's polls of its replicas).
    logging.getLogger("uvicorn.access").addFilter(_probes_at_debug)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)


PROBE_PATHS = ("/health", "/metrics")


def _probes_at_debug(record: logging.LogRecord) -> bool:
    """uvicorn's access record has args (client, method, path, version, status)."""
    args = record.args if isinstance(record.args, tuple) else ()
    if len(args) >= 3 and str(args[2]).startswith(PROBE_PATHS):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("uvicorn.access").isEnabledFor(logging.DEBUG)
    return True


def program_name(build_app: Callable) -> str:
    """`python -m step1_central_loader`, for --help: the package of the step's server module."""
    return f"python -m {build_app.__module__.split('.')[0]}"


def serve(
    build_app: Callable[[Any], Starlette], config_class: type[ServerConfig] = ServerConfig
) -> None:
    """Read config from GATEWAY_* env vars and flags, build the step's app, run uvicorn."""
    prog = program_name(build_app)
    try:
        config = config_class.load(sys.argv[1:], prog=prog)
    except ValueError as exc:  # a bad flag or env var: one line saying which, not a traceback
        raise SystemExit(f"{prog}: error: {exc}") from None
    setup_logging(config.log_level)
    uvicorn.run(build_app(config), host=config.host, port=config.port, log_level=config.log_level)
