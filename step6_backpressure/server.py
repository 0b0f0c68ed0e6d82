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

from common.api import Observers
from common.app import create_app
from step4_mock_kv.server import build_engine
from step5_observability.metrics import CacheCollector, watch_batch_sizes
from step5_observability.observability import Observability
from step5_observability.server import Config as ObservabilityConfig
from step6_backpressure.admission import (
    AdmissionCollector,
    AdmissionConfig,
    AdmissionController,
    AdmittingEngine,
    BodyLimitMiddleware,
    LimitedServing,
)
from step6_backpressure.lifecycle import Lifecycle, LifecycleConfig, serve_gracefully


@dataclass(frozen=True)
class Config(AdmissionConfig, LifecycleConfig, ObservabilityConfig):
    """Step 6: step 5's server with limits at the door, deadlines, readiness and a drain."""


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    lifecycle = lifecycle or Lifecycle(config)
    observability = Observability(config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = observability.load_model(config)
        watch_batch_sizes(lm.model, observability.metrics)
        engine, prefix_cache, response_cache = build_engine(config, lm)  # step 4's serving path
        admission = AdmissionController(config)
        observability.watch(
            CacheCollector(prefix_cache, response_cache), AdmissionCollector(admission)
        )
        engine = AdmittingEngine(engine, admission)
        engine.start()
        observer = Observers(admission, observability.observer)
        app.state.serving = LimitedServing(
            config, lm.tokenizer, lm.max_model_len, engine, observer, limits=config
        )
        lifecycle.admission = admission
        async with observability.stats_log():
            yield
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
