"""This step's parts, wired together once, for this step's server and every later one.

One Observability per app: a Prometheus registry with the server's metrics (metrics.py), the
request observer that fills them and writes one log line per request (structured_logs.py), the
periodic stats line, `GET /metrics`, and the X-Request-Id middleware. A server adds what it
wants counted at scrape time (caches, admission, KV blocks) with `watch`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from common.config import ServerConfig
from common.model import LoadedModel, load_model
from step5_observability.metrics import Metrics, MetricsObserver
from step5_observability.structured_logs import (
    LogConfig,
    RequestIdMiddleware,
    log_request,
    log_stats_every,
    use_format,
)


class Observability:
    def __init__(self, config: LogConfig) -> None:
        use_format(config.log_format)
        self.stats_interval_s = config.stats_interval_s
        self.registry = CollectorRegistry()  # one per app, so tests can build several
        self.metrics = Metrics(self.registry)
        on_end = partial(log_request, log_prompts=config.log_prompts)
        self.observer = MetricsObserver(self.metrics, on_end=on_end)
        self.routes = [Route("/metrics", self.scrape, methods=["GET"])]
        self.middleware = [Middleware(RequestIdMiddleware)]

    def load_model(self, config: ServerConfig) -> LoadedModel:
        """common.model.load_model, timed into gateway_model_load_seconds."""
        started = time.monotonic()
        lm = load_model(config)
        self.metrics.model_load.set(time.monotonic() - started)
        return lm

    def watch(self, *collectors: Collector) -> None:
        """Counters read at scrape time from the parts that keep them."""
        for collector in collectors:
            self.registry.register(collector)

    @asynccontextmanager
    async def stats_log(self) -> AsyncIterator[None]:
        """The periodic stats line, for as long as the server runs."""
        snapshot = partial(stats_snapshot, self.registry)
        task = asyncio.create_task(log_stats_every(self.stats_interval_s, snapshot))
        try:
            yield
        finally:
            task.cancel()

    async def scrape(self, http: HTTPRequest) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def stats_snapshot(registry: CollectorRegistry) -> dict:
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
