"""Step 5: observability. The server explains itself to Prometheus, Grafana and log pipelines.

New since step 4: GET /metrics (Prometheus text format), one structured log line per request and
a periodic stats line (JSON or text), X-Request-Id accepted or generated and returned. The
serving path is step 4's, unchanged. Run: python -m step5_observability
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette

from common.api import Serving
from common.app import create_app, serve
from step4_mock_kv.server import Config as MockKVConfig
from step4_mock_kv.server import build_engine, pipeline
from step5_observability.metrics import CacheCollector, watch_batch_sizes, watch_load
from step5_observability.observability import Observability
from step5_observability.structured_logs import LogConfig


@dataclass(frozen=True)
class Config(LogConfig, MockKVConfig):
    """Step 5: step 4's server, observed: metrics, structured logs, request ids."""


def build_app(config: Config) -> Starlette:
    observability = Observability(config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = observability.load_model(config)
        watch_batch_sizes(lm.model, observability.metrics)
        engine, prefix_cache, response_cache = build_engine(config, lm)  # step 4's serving path
        watch_load(engine, observability.metrics)
        observability.watch(CacheCollector(prefix_cache, response_cache))
        engine.start()
        app.state.serving = Serving(
            config,
            lm.tokenizer,
            lm.max_model_len,
            engine,
            observability.observer,
            pipeline=pipeline(response_cache, engine),
        )
        async with observability.stats_log():
            yield
        if response_cache is not None:
            await response_cache.flush()
        await engine.stop()

    return create_app(lifespan, observability.routes, observability.middleware)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
