"""Step 7, the full server: continuous batching over a paged KV cache, with prefix caching.

New since step 6: the serving engine. The batch is rebuilt every iteration (finished sequences
leave, new ones join, long prompts are prefilled in chunks beside the decodes), keys and values
live in a preallocated pool of fixed-size blocks, and full blocks are shared between prompts with
the same prefix. Around the engine, imported from the steps that taught them: step 4's response
cache, step 5's metrics and logs, step 6's admission (which here also counts free KV blocks),
deadlines, readiness and drain. Run: python -m step7_real_kv
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

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
from step7_real_kv import live
from step7_real_kv.engine import EngineConfig, KVCollector, PagedEngine
from step7_real_kv.kv_admission import KVAdmission, PoolServing
from step7_real_kv.speed import torch_thread


@dataclass(frozen=True)
class Config(
    EngineConfig, AdmissionConfig, LifecycleConfig, LogConfig, ResponseCacheConfig, ServerConfig
):
    """Step 7: the paged engine's knobs, and those of the parts kept from steps 4 to 6."""


class Server:
    """Step 7's composition: the engine, and around it the parts kept from steps 4 to 6. The
    engine's class and its own counters are named once, as attributes of the composition."""

    engine_class: type[PagedEngine] = PagedEngine

    def __init__(self, config: Config, lifecycle: Lifecycle | None = None) -> None:
        self.config = config
        self.lifecycle = lifecycle or Lifecycle(config)
        self.observability = Observability(config)

    def collectors(self, engine: PagedEngine) -> list[Collector]:
        """The engine's counters, read at scrape time."""
        return [KVCollector(engine)]

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        config, lifecycle, observability = self.config, self.lifecycle, self.observability
        # On the torch thread, like every forward pass: one OpenMP team (speed/torch_thread.py)
        on_it = torch_thread.where(config.torch_thread)
        lm = await on_it(observability.load_model, config)
        engine = await on_it(self.engine_class, lm, config)  # KV pool, scheduler, model runner
        engine.batch_size_hooks.append(observability.metrics.batch_size.observe)
        response_cache = make_response_cache(config, config.served_model_name)
        admission = KVAdmission(config, engine, lifecycle)
        watch_load(engine, observability.metrics)
        observability.watch(
            CacheCollector(engine.blocks, response_cache),  # the block manager is the prefix cache
            AdmissionCollector(admission),
            *self.collectors(engine),
        )
        engine.start()
        app.state.serving = PoolServing(
            config,
            lm.tokenizer,
            lm.max_model_len,
            engine,
            Observers(admission, observability.observer),
            pipeline=pipeline(response_cache, admission, engine),  # step 6's order
            limits=config,
        )
        async with observability.stats_log(), lifecycle.serving(admission):
            yield
        if response_cache is not None:
            await response_cache.flush()
        await engine.stop()

    def live_routes(self) -> list[Route]:
        return live.routes()  # GET /debug/engine

    def routes(self) -> list[Route]:
        """Beside the OpenAI routes: /metrics, health and drain, the engine's live page."""
        return [*self.observability.routes, *self.lifecycle.routes, *self.live_routes()]

    def middleware(self) -> list[Middleware]:
        """Outermost first: every request gets its id before the body limit or the API key
        can refuse it."""
        return [
            *self.observability.middleware,
            Middleware(BodyLimitMiddleware, limit=self.config.max_body_bytes),
            *self.lifecycle.middleware,
        ]

    def app(self) -> Starlette:
        return create_app(self.lifespan, self.routes(), self.middleware())


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    return Server(config, lifecycle).app()


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
