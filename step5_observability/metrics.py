"""Prometheus metrics: what the server does, in the names and units Prometheus expects.

`MetricsObserver` implements common.api.Observer: it sees every generation request start and
end, so each request lands in exactly one outcome, and its latencies (measured from arrival on
the monotonic clock) go into histograms when it ends. Batch sizes are read straight off the
model with a forward pre-hook; cache counters are read from the caches at scrape time.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily

from common.api import EngineLoad, Observer, Outcome
from common.request import Request

disable_created_metrics()  # no *_created series: they double the output and no panel uses them

PREFIX = "gateway"
# Seconds: from a few ms (one decode step) to minutes (a long answer under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    """Every metric of the server, registered in one registry per app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"{PREFIX}_{name}", doc, buckets=buckets, registry=registry)

        def counter(name, doc, labels=()):
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        self.requests = counter(
            "requests",
            "Generation requests by outcome and finish reason.",
            ("outcome", "finish_reason"),
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.cached_prompt_tokens = counter(
            "prompt_tokens_cached", "Prompt tokens of finished requests found in a prefix cache."
        )
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.")
        self.itl = histogram(
            "inter_token_latency_seconds", "Gap between consecutive tokens.", TOKEN_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean gap per request, first token excluded.",
            TOKEN_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.")
        self.queue_wait = histogram("queue_wait_seconds", "Arrival to leaving the queue.")
        self.batch_size = histogram("batch_size", "Sequences in one forward pass.", BATCH_BUCKETS)
        self.running = Gauge(
            f"{PREFIX}_requests_running", "Requests generating.", registry=registry
        )
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests queued.", registry=registry)
        self.model_load = Gauge(
            f"{PREFIX}_model_load_seconds",
            "Time to load the model at startup.",
            registry=registry,
        )
        self.event_loop_tasks = Gauge(
            f"{PREFIX}_event_loop_tasks", "Live asyncio tasks (leaks show here).", registry=registry
        )
        self.event_loop_tasks.set_function(_count_tasks)


def _count_tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped outside the server's loop (a test reading the registry)
        return 0


class MetricsObserver(Observer):
    def __init__(self, metrics: Metrics, on_end=None) -> None:
        self.metrics = metrics
        self.on_end_hook = on_end

    def on_end(self, http, outcome: Outcome, request: Request | None) -> None:
        finish = request.finish_reason if request is not None else None
        self.metrics.requests.labels(outcome.value, finish or "none").inc()
        if request is not None and outcome is Outcome.SUCCESS:
            self._observe_latencies(request)
        if self.on_end_hook is not None:
            self.on_end_hook(http, outcome, request)

    def _observe_latencies(self, request: Request) -> None:
        m, times = self.metrics, request.token_times
        m.prompt_tokens.inc(request.num_prompt_tokens)
        m.cached_prompt_tokens.inc(request.cached_prompt_tokens)
        m.generation_tokens.inc(sum(c.num_output_tokens for c in request.siblings))  # n choices
        if request.queue_wait_s is not None:
            m.queue_wait.observe(request.queue_wait_s)
        if request.first_token_time is not None:
            m.ttft.observe(request.first_token_time - request.arrival_time)
        if request.finish_time is not None:
            m.e2e.observe(request.finish_time - request.arrival_time)
        for earlier, later in zip(times, times[1:], strict=False):
            m.itl.observe(later - earlier)
        if len(times) > 1:
            m.tpot.observe((times[-1] - times[0]) / (len(times) - 1))


class Loaded(Protocol):
    def load(self) -> EngineLoad: ...


def watch_load(engine: Loaded, metrics: Metrics) -> None:
    """gateway_requests_{running,waiting}, asked of the engine at scrape time: it is the one
    that knows where its requests are."""
    metrics.running.set_function(lambda: engine.load().running)
    metrics.waiting.set_function(lambda: engine.load().waiting)


def watch_batch_sizes(model, metrics: Metrics):
    """Observe the number of sequences in every forward pass of `model`."""

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            metrics.batch_size.observe(input_ids.shape[0])

    return model.register_forward_pre_hook(hook, with_kwargs=True)


class CacheCollector:
    """Cache counters, read at scrape time from the caches' own stats. Hit rate is a PromQL
    ratio of two counters, so it can be computed over any window."""

    def __init__(self, prefix_cache=None, response_cache=None) -> None:
        self.prefix_cache, self.response_cache = prefix_cache, response_cache

    def collect(self):
        if self.prefix_cache is not None:
            stats = self.prefix_cache.stats
            yield _counter(
                "prefix_cache_queried_tokens", "Prompt tokens looked up.", stats.queried_tokens
            )
            yield _counter(
                "prefix_cache_hit_tokens", "Prompt tokens found cached.", stats.hit_tokens
            )
            yield _counter("prefix_cache_evictions", "Blocks evicted.", stats.evictions)
        if self.response_cache is not None:
            stats = self.response_cache.stats
            yield _counter("response_cache_queries", "Cacheable requests looked up.", stats.queries)
            yield _counter("response_cache_hits", "Requests answered from the cache.", stats.hits)
            yield _counter("response_cache_errors", "Backend failures bypassed.", stats.errors)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
