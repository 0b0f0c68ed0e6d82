"""Forwarding one request: pick a replica, try once more elsewhere if it refuses, relay the answer.

- The policy (routing.py) picks among the replicas that are in and not resting; the body goes
  out unchanged, with the client's X-Request-Id, Cache-Control and X-Queue-Timeout.
- A 429 or 503 makes that replica rest for its Retry-After (nothing is sent to it before), and
  the request is tried once more, on another replica. A replica that refuses the connection is
  taken out (nothing reached it) and the request is tried on another. When no replica is left,
  the client gets one 429 (503 when none was merely busy) with the shortest Retry-After.
- A stream passes through chunk by chunk as the replica sends it. A replica that fails mid-stream
  gives the client an in-band error event in OpenAI's shape, never a silently short answer. A
  client that goes away closes the stream to the replica, which sees the disconnect and cancels
  the request, as it would for a client of its own.
- A whole (non-streamed) answer is read, then sent with the replica's status; a failure before
  it is complete is a 502. A request whose replica already had it is not retried.

Every answer a replica gave carries `X-Upstream: host:port`.

The proxy is the router's door too: it owns the count of requests outstanding (per replica), so
the lifecycle's drain and readiness ask it, and each request's `RequestLog` reports its one
outcome, its TTFT and its latency to step 5's metrics, as an engine's requests do.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator

import anyio
import httpx
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from common.api import EngineLoad, Outcome, sse_event
from common.errors import APIError
from step5_observability.metrics import Metrics
from step5_observability.structured_logs import REQUEST_ID
from step6_backpressure.admission import Draining
from step9_router.routing import Router
from step9_router.upstreams import Upstream, UpstreamPool

log = logging.getLogger("gateway.requests")

MAX_ATTEMPTS = 2  # the first try and one retry on another replica
REFUSALS = (429, 503)
FORWARDED = ("content-type", "accept", REQUEST_ID, "cache-control", "x-queue-timeout")
RELAYED = ("content-type", "retry-after", "x-cache", "cache-control", "x-accel-buffering")
UPSTREAM_HEADER = "X-Upstream"


class Proxy:
    def __init__(
        self,
        pool: UpstreamPool,
        router: Router,
        client: httpx.AsyncClient,
        lifecycle: Draining,
        api_key: str = "",
    ) -> None:
        self.pool, self.router, self.client, self.lifecycle = pool, router, client, lifecycle
        self.auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.reasons: Counter[str] = Counter()  # refusals, by reason (as step 6's door counts)

    def admit(self) -> None:
        """Step 6's door, at the router: it queues nothing, so only the drain closes it."""
        if self.lifecycle.draining:
            self.reasons["rejected:draining"] += 1
            headers = {"Retry-After": "1"}
            raise APIError("the server is shutting down; retry elsewhere", 503, headers=headers)

    # What step 5's gauges and step 6's lifecycle ask: the requests the replicas have.
    def load(self) -> EngineLoad:
        return EngineLoad(running=sum(u.outstanding for u in self.pool.upstreams.values()))

    def in_flight(self) -> int:
        return self.load().in_flight

    def saturated(self) -> bool:
        return False  # the replicas say when they are: their 429s

    async def forward(
        self, http: HTTPRequest, path: str, body: bytes, prompt: str, done: RequestLog
    ) -> Response:
        """POST `body` to `path` on a replica chosen for `prompt`; the replica's answer."""
        names = self.router.names(prompt)
        headers = {k: v for k, v in http.headers.items() if k in FORWARDED} | self.auth
        tried: list[Upstream] = []
        refusals: list[int] = []
        why = ""  # what the last replica tried said: a status, or "connect"
        while len(tried) < MAX_ATTEMPTS and (upstream := self.choose(names, tried)):
            if tried:  # moving the request away from the replica that could not take it
                tried[-1].retries[why] += 1
            tried.append(upstream)
            response = await self.send(upstream, path, body, headers)
            if response is None:  # the connection was refused: nothing reached it
                why = "connect"
                continue
            if response.status_code in REFUSALS:
                why = str(response.status_code)
                refusals.append(response.status_code)
                await self.refused(upstream, response)
                continue
            done.upstream, done.attempts = upstream, len(tried)
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                return self.relay_stream(upstream, response, done)
            return await self.relay_whole(upstream, response, done)
        raise self.unavailable(refusals)

    def choose(self, names: list[bytes], tried: list[Upstream]) -> Upstream | None:
        candidates = self.pool.candidates(exclude=tried)
        if not candidates:
            return None
        loads = {u.url: u.outstanding for u in candidates}
        decision = self.router.choose([u.url for u in candidates], loads, names)
        upstream = self.pool.upstreams[decision.upstream]
        upstream.decisions[decision.reason] += 1
        return upstream

    async def send(
        self, upstream: Upstream, path: str, body: bytes, headers: dict[str, str]
    ) -> httpx.Response | None:
        """The replica's response, once its headers are in; None if it refused the connection."""
        upstream.outstanding += 1
        request = self.client.build_request(
            "POST", upstream.url + path, content=body, headers=headers
        )
        try:
            return await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            upstream.finish(Outcome.SERVER_ERROR)
            upstream.errors["connect"] += 1
            self.pool.take_out(upstream, f"connection failed: {exc!r}", unreachable=True)
            return None
        except httpx.HTTPError as exc:  # it had the request: its answer is lost, not retried
            upstream.finish(Outcome.SERVER_ERROR)
            self.broken(upstream, exc)
            raise _failed(upstream, exc) from None
        except asyncio.CancelledError:  # the client went away while the replica worked
            upstream.finish(Outcome.CANCELLED)
            raise

    def broken(self, upstream: Upstream, exc: Exception) -> None:
        """A replica that broke off an answer is out until its next poll passes."""
        upstream.errors["broken"] += 1
        self.pool.take_out(upstream, f"answer broken off: {exc!r}")

    async def refused(self, upstream: Upstream, response: httpx.Response) -> None:
        await response.aclose()
        upstream.finish(Outcome.REJECTED)
        upstream.rest(_retry_after_s(response.headers.get("retry-after")))

    def unavailable(self, refusals: list[int]) -> APIError:
        """One 429 or 503 for the whole fleet, with the shortest wait any replica asked for."""
        now = time.monotonic()
        ready = self.pool.ready()
        wait = min((u.resting_until - now for u in ready if u.resting(now)), default=1.0)
        headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        if not ready:
            code, status, message = "no_upstream", 503, "no replica is ready to take the request"
        elif refusals and 429 not in refusals:
            code, status, message = "upstreams_unavailable", 503, "the replicas tried answered 503"
        else:
            code, status, message = "upstreams_busy", 429, f"all {len(ready)} replicas are busy"
        message += "; try again later"
        self.reasons[f"rejected:{code}"] += 1
        return APIError(message, status, code=code, headers=headers)

    async def get(self, path: str, body: bytes | None = None) -> Response:
        """A question any replica answers alike, put to the first ready one that answers: a
        GET (the model list), or a POST of `body` (/tokenize, /detokenize)."""
        for upstream in self.pool.ready():
            method = "GET" if body is None else "POST"
            headers = {**self.auth, "content-type": "application/json"}
            try:
                response = await self.client.request(
                    method, upstream.url + path, content=body, headers=headers
                )
            except httpx.HTTPError:
                continue
            headers = relayed_headers(upstream, response)
            return Response(response.content, response.status_code, headers=headers)
        headers = {"Retry-After": "1"}
        raise APIError(
            "no replica is ready; try again later", 503, code="no_upstream", headers=headers
        )

    # ------------------------------------------------------------ relaying the answer

    async def relay_whole(
        self, upstream: Upstream, response: httpx.Response, done: RequestLog
    ) -> Response:
        try:
            content = await response.aread()
        except httpx.HTTPError as exc:
            self.broken(upstream, exc)
            done.end(Outcome.SERVER_ERROR, response.status_code)
            raise _failed(upstream, exc) from None
        except asyncio.CancelledError:
            done.end(Outcome.CANCELLED, response.status_code)
            raise
        finally:
            await _close(response)
        status = response.status_code
        done.end(Outcome.SUCCESS if status == 200 else Outcome.for_status(status), status)
        return Response(content, status, headers=relayed_headers(upstream, response))

    def relay_stream(
        self, upstream: Upstream, response: httpx.Response, done: RequestLog
    ) -> StreamingResponse:
        chunks = self.chunks(upstream, response, done)
        return RelayedStream(chunks, relayed_headers(upstream, response), response, done)

    async def chunks(
        self, upstream: Upstream, response: httpx.Response, done: RequestLog
    ) -> AsyncIterator[bytes | str]:
        outcome, end = Outcome.CANCELLED, StreamEnd()  # cancelled unless it gets to its end
        try:
            async for chunk in response.aiter_bytes():
                end.feed(chunk)
                if end.tokens_seen:
                    done.first_token()
                yield chunk
            if not end.seen:
                raise httpx.RemoteProtocolError("the stream ended before [DONE]")
            outcome = Outcome.SERVER_ERROR if end.error else Outcome.SUCCESS
        except httpx.HTTPError as exc:
            outcome = Outcome.SERVER_ERROR
            self.broken(upstream, exc)
            yield sse_event(_failed(upstream, exc).body())
        finally:
            await _close(response)
            done.end(outcome, response.status_code)


class RelayedStream(StreamingResponse):
    """A stream that lets go of the replica's response however it ends, even when it never
    started (a client gone before the first chunk, so the generator never ran its `finally`)."""

    def __init__(self, chunks, headers, response: httpx.Response, done: RequestLog) -> None:
        super().__init__(chunks, headers=headers)
        self.relayed, self.done = response, done

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self.relayed)
            self.done.end(Outcome.CANCELLED, self.relayed.status_code)  # unless it ended


class StreamEnd:
    """Watches a relayed stream for its first token (a chunk with text in it) and its proper
    end: `data: [DONE]`, or an in-band error event from the replica (which ends it too).
    Markers may straddle two chunks: a tail is kept."""

    TEXT = re.compile(rb'"(?:content|text)": ?"[^"]')  # a chunk that carries text

    def __init__(self) -> None:
        self.tail, self.done, self.error, self.tokens_seen = b"", False, False, False

    @property
    def seen(self) -> bool:
        return self.done or self.error

    def feed(self, chunk: bytes) -> None:
        window = self.tail + chunk
        self.done = self.done or b"data: [DONE]" in window
        self.error = self.error or b'data: {"error"' in window
        self.tokens_seen = self.tokens_seen or self.TEXT.search(window) is not None
        self.tail = window[-16:]


class RequestLog:
    """One request at the router, from arrival to its end: its line in the log, its outcome on
    its replica (once one answered) and in step 5's metrics, written once, when it ends."""

    def __init__(self, metrics: Metrics, request_id: str | None) -> None:
        self.metrics, self.request_id = metrics, request_id
        self.started = time.monotonic()
        self.upstream: Upstream | None = None  # the replica that answered
        self.attempts = 0
        self.first_token_time: float | None = None
        self.ended = False

    def first_token(self) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def end(self, outcome: Outcome, status: int) -> None:
        """The first call counts; later ones (the same end, seen from outside) do nothing."""
        if self.ended:
            return
        self.ended = True
        now = time.monotonic()
        if self.upstream is not None:
            self.upstream.finish(outcome)
        self.metrics.requests.labels(outcome.value, "none").inc()
        if outcome is Outcome.SUCCESS:
            # A whole answer reaches the client all at once: its first token comes with it.
            self.metrics.ttft.observe((self.first_token_time or now) - self.started)
            self.metrics.e2e.observe(now - self.started)
        fields = {
            "request_id": self.request_id,
            "outcome": outcome.value,
            "status": status,
            "upstream": self.upstream.name if self.upstream is not None else None,
            "attempts": self.attempts,
            "ttft_s": _round(self.first_token_time, self.started),
            "e2e_s": round(now - self.started, 4),
        }
        log.info("request", extra={"fields": fields})


def _round(moment: float | None, start: float) -> float | None:
    return round(moment - start, 4) if moment is not None else None


def relayed_headers(upstream: Upstream, response: httpx.Response) -> dict[str, str]:
    headers = {k: v for k, v in response.headers.items() if k in RELAYED}
    return {**headers, UPSTREAM_HEADER: upstream.name}


def _failed(upstream: Upstream, exc: Exception) -> APIError:
    message = (
        f"replica {upstream.name} failed before the answer was complete ({type(exc).__name__})"
    )
    headers = {UPSTREAM_HEADER: upstream.name}
    return APIError(message, 502, code="upstream_failed", headers=headers)


def _retry_after_s(header: str | None) -> float:
    """Seconds from a Retry-After header (engines do not send the HTTP-date form); 1 if absent."""
    try:
        return min(60.0, max(0.0, float(header))) if header else 1.0
    except ValueError:
        return 1.0


async def _close(response: httpx.Response) -> None:
    """Close the replica's response even while our task is being cancelled (a client that left):
    closing an unfinished response drops the connection, which is what tells the replica."""
    with anyio.CancelScope(shield=True):
        await response.aclose()
