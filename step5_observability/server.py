"""Step 5: observability. The server explains itself to Prometheus, Grafana and log pipelines.

New since step 4: GET /metrics (Prometheus text format), one structured log line per request and
a periodic stats line (JSON or text), X-Request-Id accepted or generated and returned. The
serving path is step 4's, unchanged. Run: python -m step5_observability
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.routing import Route

from common.api import Serving
from common.app import create_app, serve
from common.model import load_model
from step4_mock_kv.server import Config as MockKVConfig
from step4_mock_kv.server import build_engine
from step5_observability.metrics import (
    CacheCollector,
    Metrics,
    MetricsObserver,
    watch_batch_sizes,
)
from step5_observability.structured_logs import (
    RequestIdMiddleware,
    log_request,
    log_stats_every,
    use_format,
)


@dataclass(frozen=True)
class Config(MockKVConfig):
    log_format: str = "text"  # text | json
    log_prompts: bool = False  # put prompt token ids in request log lines
    stats_interval_s: float = 10.0  # period of the stats log line

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.log_format not in ("text", "json") or self.stats_interval_s <= 0:
            raise ValueError("log_format must be text or json; stats_interval_s > 0")


def build_app(config: Config) -> Starlette:
    registry = CollectorRegistry()  # one per app, so tests can build several
    metrics = Metrics(registry)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm, engine, observer, _ = load_observed(config, registry, metrics)
        engine.start()
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine, observer)
        stats = start_stats_log(config, registry)
        yield
        stats.cancel()
        await engine.stop()

    return create_app(lifespan, [metrics_route(registry)], [Middleware(RequestIdMiddleware)])


def load_observed(config: Config, registry: CollectorRegistry, metrics: Metrics, build=None):
    """The model and an engine (step 4's unless `build` makes another), observed: load time,
    batch sizes, cache counters. `build(config, lm)` returns (engine, prefix cache, *collectors).
    Returns the model, the engine, the request observer and the prefix cache."""
    use_format(config.log_format)
    started = time.monotonic()
    lm = load_model(config)
    metrics.model_load.set(time.monotonic() - started)
    watch_batch_sizes(lm.model, metrics)
    engine, prefix_cache, *collectors = (build or build_engine)(config, lm)
    registry.register(CacheCollector(prefix_cache, getattr(engine, "cache", None)))
    for collector in collectors:  # an engine's own metrics, if it has any
        registry.register(collector)
    on_end = partial(log_request, log_prompts=config.log_prompts)
    return lm, engine, MetricsObserver(metrics, on_end=on_end), prefix_cache


def start_stats_log(config: Config, registry: CollectorRegistry) -> asyncio.Task:
    return asyncio.create_task(
        log_stats_every(config.stats_interval_s, partial(snapshot, registry))
    )


def metrics_route(registry: CollectorRegistry) -> Route:
    async def metrics_endpoint(http) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics_endpoint, methods=["GET"])


def snapshot(registry: CollectorRegistry) -> dict:
    """The numbers of the periodic stats line, read back from the metrics."""

    def value(name: str) -> float:
        return registry.get_sample_value(f"gateway_{name}") or 0.0

    def ratio(hits: str, total: str) -> float:
        return round(value(hits) / value(total), 3) if value(total) else 0.0

    return {
        "generation_tokens": value("generation_tokens_total"),
        "running": value("requests_running"),
        "waiting": value("requests_waiting"),
        "prefix_cache_hit_rate": ratio(
            "prefix_cache_hit_tokens_total", "prefix_cache_queried_tokens_total"
        ),
        "response_cache_hit_rate": ratio(
            "response_cache_hits_total", "response_cache_queries_total"
        ),
    }


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
