"""The starlette app factory and the `python -m stepN_name` entry point every step uses."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette

from common.api import ROUTES
from common.config import ServerConfig
from common.errors import EXCEPTION_HANDLERS


def create_app(lifespan, extra_routes: list | None = None, middleware=None) -> Starlette:
    """The OpenAI routes plus a step's own, with OpenAI-shaped errors for every failure."""
    return Starlette(
        routes=[*ROUTES, *(extra_routes or [])],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        middleware=middleware,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def program_name(build_app: Callable) -> str:
    """`python -m step1_central_loader`, for --help: the package of the step's server module."""
    return f"python -m {build_app.__module__.split('.')[0]}"


def serve(build_app: Callable[[ServerConfig], Starlette], config_class=ServerConfig) -> None:
    """Read config from GATEWAY_* env vars and flags, build the step's app, run uvicorn."""
    config = config_class.load(sys.argv[1:], prog=program_name(build_app))
    setup_logging(config.log_level)
    uvicorn.run(build_app(config), host=config.host, port=config.port, log_level=config.log_level)
