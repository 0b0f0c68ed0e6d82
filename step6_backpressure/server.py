"""Step 6: backpressure and stability. Stay useful when more work arrives than can be done.

New since step 5: admission control (bounded waiting requests and prompt tokens, 429 with
Retry-After), queue deadlines, input limits, liveness vs readiness, a graceful drain on SIGTERM,
an optional API key, and rejection/timeout/cancellation counts. Serving is step 5's.
Run: python -m step6_backpressure
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from prometheus_client import CollectorRegistry, Gauge
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from common.api import Observers
from common.app import create_app, setup_logging
from step5_observability.metrics import Metrics
from step5_observability.server import Config as ObservabilityConfig
from step5_observability.server import load_observed, metrics_route, start_stats_log
from step5_observability.structured_logs import (
    RequestIdMiddleware,
)
from step6_backpressure.admission import (
    AdmissionCollector,
    AdmissionController,
    AdmittingEngine,
    BodyLimitMiddleware,
    LimitedServing,
    Limits,
)
from step6_backpressure.lifecycle import (
    ApiKeyMiddleware,
    GracefulServer,
    Lifecycle,
    live,
    readiness,
)


@dataclass(frozen=True)
class Config(ObservabilityConfig):
    max_waiting_requests: int = 64  # admitted but not yet running; one more gets a 429
    max_waiting_tokens: int = 32768  # prompt tokens of those
    queue_timeout_s: float = 30.0  # default deadline to start generating
    max_queue_timeout_s: float = 120.0  # the most a request may ask for (X-Queue-Timeout)
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 1024  # the largest max_tokens accepted
    max_body_bytes: int = 1 << 20
    ready_when_saturated: bool = False
    drain_timeout_s: float = 30.0
    api_key: str = ""  # empty: no authentication

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.max_waiting_requests, self.max_waiting_tokens, self.max_body_bytes) < 1:
            raise ValueError("waiting bounds and max_body_bytes must be at least 1")

    def limits(self) -> Limits:
        return Limits(
            self.max_waiting_requests,
            self.max_waiting_tokens,
            self.queue_timeout_s,
            self.max_queue_timeout_s,
            self.max_prompt_tokens,
            self.max_tokens_limit,
        )


def build_app(
    config: Config, lifecycle: Lifecycle | None = None, build=None, admission=None
) -> Starlette:
    """`build(config, lm) -> (engine, prefix cache, *collectors)` swaps the serving engine, and
    `admission(limits, prefix cache)` the admission controller (step 7 does both)."""
    lifecycle = lifecycle or Lifecycle(config.drain_timeout_s)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    tasks = Gauge(
        "gateway_event_loop_tasks", "Live asyncio tasks (leaks show here).", registry=registry
    )
    tasks.set_function(lambda: len(asyncio.all_tasks()))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm, inner, metrics_observer, prefix_cache = load_observed(config, registry, metrics, build)
        controller = (admission or _plain_admission)(config.limits(), prefix_cache)
        registry.register(AdmissionCollector(controller))
        observer = Observers(controller, metrics_observer)
        engine = AdmittingEngine(inner, controller)
        engine.start()
        app.state.serving = LimitedServing(
            config, lm.tokenizer, lm.max_model_len, engine, observer, config.limits()
        )
        lifecycle.admission = controller
        stats = start_stats_log(config, registry)
        yield
        stats.cancel()
        await engine.stop()

    routes = [
        metrics_route(registry),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", readiness(lifecycle, config.ready_when_saturated), methods=["GET"]),
    ]
    middleware = [
        Middleware(RequestIdMiddleware),
        Middleware(BodyLimitMiddleware, limit=config.max_body_bytes),
    ]
    if config.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=config.api_key))
    app = create_app(lifespan, routes, middleware)
    app.state.lifecycle = lifecycle
    return app


def _plain_admission(limits: Limits, prefix_cache) -> AdmissionController:
    return AdmissionController(limits)


def serve_gracefully(build, config_class) -> None:
    """Like common.app.serve, but the first SIGTERM drains (see lifecycle.py)."""
    config = config_class.load(sys.argv[1:])
    setup_logging(config.log_level)
    lifecycle = Lifecycle(config.drain_timeout_s)
    uv_config = uvicorn.Config(
        build(config, lifecycle),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=5,
    )
    GracefulServer(uv_config, lifecycle).run()


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
