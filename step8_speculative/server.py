"""Step 8: speculative decoding. Step 7's server, its engine guessing ahead and checking.

New since step 7: before each iteration, every decoding sequence gets a draft of up to k
tokens looked up in its own prompt and output (prompt lookup); the draft is verified in the same
forward pass as everyone else's work, and the longest prefix the model agrees with is kept,
plus one token of the model's own: greedy answers stay exactly step 7's, sampled ones keep the
model's distribution. Everything else is step 7's. Run: python -m step8_speculative
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware

from common.api import Observers
from common.app import create_app
from common.config import ServerConfig
from step4_mock_kv.response_cache import ResponseCacheConfig, make_response_cache
from step5_observability.metrics import CacheCollector, watch_load
from step5_observability.observability import Observability
from step5_observability.structured_logs import LogConfig
from step6_backpressure.admission import AdmissionCollector, AdmissionConfig, BodyLimitMiddleware
from step6_backpressure.lifecycle import Lifecycle, LifecycleConfig, serve_gracefully
from step6_backpressure.server import pipeline
from step7_real_kv.engine import KVCollector
from step7_real_kv.kv_admission import KVAdmission, PoolServing
from step8_speculative import live
from step8_speculative.engine import SpecCollector, SpeculativeConfig, SpeculativeEngine


@dataclass(frozen=True)
class Config(
    SpeculativeConfig,
    AdmissionConfig,
    LifecycleConfig,
    LogConfig,
    ResponseCacheConfig,
    ServerConfig,
):
    """Step 8: step 7's knobs, and the proposer's (k, n-gram sizes) and where it stops."""


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    lifecycle = lifecycle or Lifecycle(config)
    observability = Observability(config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = observability.load_model(config)
        engine = SpeculativeEngine(lm, config)  # step 7's engine, with a proposer and verify
        engine.batch_size_hooks.append(observability.metrics.batch_size.observe)
        response_cache = make_response_cache(config, config.served_model_name)
        admission = KVAdmission(config, engine, lifecycle)
        watch_load(engine, observability.metrics)
        observability.watch(
            CacheCollector(engine.blocks, response_cache),
            AdmissionCollector(admission),
            KVCollector(engine),
            SpecCollector(engine),
        )
        engine.start()
        app.state.serving = PoolServing(
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

    routes = [*observability.routes, *lifecycle.routes, *live.routes()]  # GET /debug/engine
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
