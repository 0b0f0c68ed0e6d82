"""Step 6: backpressure and stability. Stay useful when more work arrives than can be done.

New since step 5: admission control (bounded waiting requests and prompt tokens, 429 with
Retry-After), queue deadlines, input limits, liveness vs readiness, a graceful drain on SIGTERM,
an optional API key, and rejection/timeout/cancellation counts. Serving is step 5's.
Run: python -m step6_backpressure
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware

from common.api import Engine, Observers, Submit
from common.app import create_app
from common.request import Request
from step4_mock_kv.response_cache import ResponseCache
from step4_mock_kv.server import build_engine
from step5_observability.metrics import CacheCollector, watch_batch_sizes, watch_load
from step5_observability.observability import Observability
from step5_observability.server import Config as ObservabilityConfig
from step6_backpressure.admission import (
    AdmissionCollector,
    AdmissionConfig,
    AdmissionController,
    BodyLimitMiddleware,
    LimitedServing,
)
from step6_backpressure.lifecycle import Lifecycle, LifecycleConfig, serve_gracefully


@dataclass(frozen=True)
class Config(AdmissionConfig, LifecycleConfig, ObservabilityConfig):
    """Step 6: step 5's server with limits at the door, deadlines, readiness and a drain."""


def pipeline(
    response_cache: ResponseCache | None, admission: AdmissionController, engine: Engine
) -> Submit:
    """A valid request's way: the response cache (a hit needs nothing more), then the door,
    then the engine. Nothing awaits between the door's count and the engine's submit."""

    async def submit(request: Request) -> None:
        if response_cache is not None and await response_cache.answer(request):
            return
        admission.admit(request)
        await engine.submit(request)

    return submit


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    lifecycle = lifecycle or Lifecycle(config)
    observability = Observability(config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = observability.load_model(config)
        watch_batch_sizes(lm.model, observability.metrics)
        engine, prefix_cache, response_cache = build_engine(config, lm)  # step 4's serving path
        admission = AdmissionController(config, engine, lifecycle)
        watch_load(engine, observability.metrics)
        observability.watch(
            CacheCollector(prefix_cache, response_cache), AdmissionCollector(admission)
        )
        engine.start()
        app.state.serving = LimitedServing(
            config,
            lm.tokenizer,
            lm.max_model_len,
            engine,
            Observers(admission, observability.observer),
            pipeline=pipeline(response_cache, admission, engine),
            limits=config,
        )
        async with observability.stats_log(), lifecycle.serving(admission):
            yield
        if response_cache is not None:
            await response_cache.flush()
        await engine.stop()

    routes = [*observability.routes, *lifecycle.routes]
    middleware = [
        *observability.middleware,
        Middleware(BodyLimitMiddleware, limit=config.max_body_bytes),
        *lifecycle.middleware,
    ]
    return create_app(lifespan, routes, middleware)


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
