"""The replicas behind the router: where they are, which are up, what each one is doing.

Each `Upstream` owns its state: ready or not, requests outstanding, resting after a 429/503
until its Retry-After has passed, and its counters. The `UpstreamPool` finds the replicas (a
fixed list of URLs, or every address a DNS name resolves to, looked up again at every poll, as a
Kubernetes headless service gives them) and polls their readiness: `GET /health/ready` (steps 6
and 7), or `GET /health` for a server that has no such route (step 5, vLLM, llama.cpp). A replica
that fails a poll, or refuses a connection, is taken out at once and put back by the first poll
it passes; the routing policy never sees it meanwhile. `UpstreamCollector` exports the counters.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.api import Outcome
from common.config import ConfigPart, knob

log = logging.getLogger("gateway.upstreams")


@dataclass(frozen=True)
class UpstreamConfig(ConfigPart):
    upstreams: str = knob(
        "",
        "engine URLs, comma-separated, or dns://NAME:PORT for every address NAME resolves to; "
        "empty: start `replicas` local step 8 engines",
    )
    replicas: int = knob(2, "local step 8 engines to start when `upstreams` is empty")
    upstream_api_key: str = knob("", "sent to the engines as `Authorization: Bearer` (vLLM)")
    health_interval_s: float = knob(1.0, "seconds between two readiness polls of every engine")
    health_timeout_s: float = knob(2.0, "a readiness poll slower than this fails")
    connect_timeout_s: float = knob(2.0, "an engine that does not accept a connection by then")
    read_timeout_s: float = knob(300.0, "the longest silence accepted from an engine mid-answer")
    startup_timeout_s: float = knob(300.0, "how long local engines may take to become ready")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.replicas < 1 and not self.upstreams:
            raise ValueError("replicas must be at least 1 when no upstreams are given")
        timeouts = (self.health_interval_s, self.health_timeout_s, self.connect_timeout_s)
        if min(*timeouts, self.read_timeout_s, self.startup_timeout_s) <= 0:
            raise ValueError("intervals and timeouts must be positive")


@dataclass(eq=False)
class Upstream:
    url: str  # http://host:port, no trailing slash
    ready: bool = False
    outstanding: int = 0  # requests sent and not yet fully answered
    resting_until: float = 0.0  # monotonic time before which a 429/503 asked us to stay away
    health_path: str = "/health/ready"  # becomes /health for a server without readiness
    requests: Counter[str] = field(default_factory=Counter)  # by Outcome value
    errors: Counter[str] = field(default_factory=Counter)  # connect, broken, health
    retries: Counter[str] = field(default_factory=Counter)  # requests moved away, by status
    decisions: Counter[str] = field(default_factory=Counter)  # the policy's reasons

    @property
    def name(self) -> str:
        """host:port, what the X-Upstream header and the metrics' `upstream` label say."""
        return urlsplit(self.url).netloc

    def resting(self, now: float) -> bool:
        return now < self.resting_until

    def rest(self, seconds: float) -> None:
        self.resting_until = max(self.resting_until, time.monotonic() + seconds)

    def finish(self, outcome: Outcome) -> None:
        self.outstanding -= 1
        self.requests[outcome.value] += 1


class UpstreamPool:
    """The replicas by URL, found by `discover` and kept up to date by `poll_forever`."""

    def __init__(self, config: UpstreamConfig, on_removed: Callable[[str], None]) -> None:
        self.config = config
        self.upstreams: dict[str, Upstream] = {}
        self.on_removed = on_removed  # the router forgets what it thought the replica held

    def set_urls(self, urls: Iterable[str]) -> None:
        """Add new replicas (not ready until polled), drop the ones no longer listed."""
        wanted = [url.rstrip("/") for url in urls]
        for url in wanted:
            self.upstreams.setdefault(url, Upstream(url))
        for url in [url for url in self.upstreams if url not in wanted]:
            del self.upstreams[url]
            self.on_removed(url)
            log.warning("upstream %s removed: no longer discovered", url)

    def candidates(self, exclude: Iterable[Upstream] = ()) -> list[Upstream]:
        """Ready replicas that are not resting, minus `exclude`, in a stable order."""
        now, skip = time.monotonic(), set(map(id, exclude))
        return [
            u
            for u in self.upstreams.values()
            if u.ready and not u.resting(now) and id(u) not in skip
        ]

    def ready(self) -> list[Upstream]:
        return [u for u in self.upstreams.values() if u.ready]

    def take_out(self, upstream: Upstream, why: str, unreachable: bool = False) -> None:
        """Out of rotation. An unreachable replica may come back restarted, with an empty
        cache, so the router forgets its record; a busy or draining one keeps it."""
        if upstream.ready:
            log.warning("upstream %s taken out: %s", upstream.url, why)
        if unreachable:
            self.on_removed(upstream.url)
        upstream.ready = False

    def put_back(self, upstream: Upstream) -> None:
        if not upstream.ready:
            log.info("upstream %s ready", upstream.url)
        upstream.ready = True

    # ------------------------------------------------------------ discovery and polling

    async def discover(self) -> None:
        spec = self.config.upstreams
        if spec.startswith("dns://"):
            self.set_urls(await resolve(spec))
        elif spec:
            self.set_urls(url.strip() for url in spec.split(",") if url.strip())

    async def poll_forever(self, client: httpx.AsyncClient) -> None:
        while True:
            await self.poll_once(client)
            await asyncio.sleep(self.config.health_interval_s)

    async def poll_once(self, client: httpx.AsyncClient) -> None:
        try:
            await self.discover()
        except OSError as exc:  # DNS down: keep the replicas we know, poll them anyway
            log.warning("discovery failed: %s", exc)
        await asyncio.gather(*(self.poll(client, u) for u in list(self.upstreams.values())))

    async def poll(self, client: httpx.AsyncClient, upstream: Upstream) -> None:
        timeout = self.config.health_timeout_s
        try:
            response = await client.get(upstream.url + upstream.health_path, timeout=timeout)
            if response.status_code == 404 and upstream.health_path != "/health":
                upstream.health_path = "/health"  # no readiness route: liveness will do
                response = await client.get(upstream.url + "/health", timeout=timeout)
        except httpx.HTTPError as exc:
            upstream.errors["health"] += 1
            why = f"health poll failed: {type(exc).__name__}"
            return self.take_out(upstream, why, unreachable=True)
        log.debug("poll %s: %d", upstream.url, response.status_code)
        if response.status_code == 200:
            return self.put_back(upstream)
        reason = _reason(response)
        self.take_out(upstream, f"{upstream.health_path} answered {response.status_code} {reason}")


async def resolve(spec: str) -> list[str]:
    """dns://NAME:PORT -> http://ADDRESS:PORT for every address NAME resolves to, sorted."""
    parts = urlsplit(spec)
    host, port = parts.hostname or "", parts.port or 8000
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json().get("reason", ""))
    except ValueError:
        return ""


class UpstreamCollector:
    """Per-replica series, read at scrape time from the Upstream objects that keep them."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def collect(self):
        label = ["upstream"]
        ready = GaugeMetricFamily(
            "gateway_upstream_ready", "1 while the replica is in.", labels=label
        )
        outstanding = GaugeMetricFamily(
            "gateway_upstream_outstanding", "Requests sent and not yet answered.", labels=label
        )
        requests = _family("requests", "Requests answered by the replica, by outcome.", "outcome")
        errors = _family("errors", "Connection, mid-answer and health-poll failures.", "kind")
        retries = _family("retries", "Requests moved to another replica, by status.", "status")
        decisions = CounterMetricFamily(
            "gateway_routing_decisions",
            "Routing decisions, by the replica chosen and the policy's reason.",
            labels=["upstream", "reason"],
        )
        for u in list(self.pool.upstreams.values()):
            ready.add_metric([u.name], int(u.ready))
            outstanding.add_metric([u.name], u.outstanding)
            _add(requests, u.name, u.requests)
            _add(errors, u.name, u.errors)
            _add(retries, u.name, u.retries)
            _add(decisions, u.name, u.decisions)
        yield from (ready, outstanding, requests, errors, retries, decisions)


def _family(name: str, doc: str, label: str) -> CounterMetricFamily:
    return CounterMetricFamily(f"gateway_upstream_{name}", doc, labels=["upstream", label])


def _add(family: CounterMetricFamily, name: str, counts: Counter[str]) -> None:
    for key, count in sorted(counts.items()):
        family.add_metric([name, key], count)
