"""Step 9, the router: the same API in front of many engines, each request sent where its prefix
is most likely cached.

New since step 8: this server holds no model. It forwards each request to one of N engines (step
8 processes it starts itself, or any OpenAI-compatible servers by URL or DNS name), picked by the
routing policy (routing.py; cache_aware by default), and streams the answer through. In front,
once for the fleet: step 4's response cache (shared through Redis), step 5's metrics and logs
with per-replica series, step 6's body limit, readiness, drain and API key.
Run: python -m step9_router
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common import protocol
from common.api import NO_CACHE, Outcome, off_loop, until_disconnect
from common.app import ErrorBoundary, frozen_after_startup
from common.config import ServerConfig
from common.errors import EXCEPTION_HANDLERS, APIError
from step4_mock_kv.response_cache import ResponseCacheConfig
from step5_observability.metrics import CacheCollector, Metrics, watch_load
from step5_observability.observability import Observability
from step5_observability.structured_logs import REQUEST_ID, LogConfig
from step6_backpressure.admission import AdmissionCollector, AdmissionConfig, BodyLimitMiddleware
from step6_backpressure.lifecycle import Lifecycle, LifecycleConfig, readiness, serve_gracefully
from step9_router import live
from step9_router.answer_cache import AnswerCache, make_answer_cache
from step9_router.proxy import Proxy, RequestLog
from step9_router.replicas import LocalReplicas
from step9_router.routing import Router, RoutingConfig, prompt_text
from step9_router.upstreams import UpstreamCollector, UpstreamConfig, UpstreamPool


@dataclass(frozen=True)
class Config(
    RoutingConfig,
    UpstreamConfig,
    AdmissionConfig,
    LifecycleConfig,
    LogConfig,
    ResponseCacheConfig,
    ServerConfig,
):
    """Step 9: the router's knobs. Model, device, dtype, admission, lifecycle and log settings
    also configure the local engines it starts (GATEWAY_* env vars reach them too)."""


@dataclass
class Fleet:
    """What the routes need, set on app.state.fleet by the lifespan."""

    proxy: Proxy
    cache: AnswerCache | None
    metrics: Metrics


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    lifecycle = lifecycle or Lifecycle(config)
    observability = Observability(config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        router = Router(config)
        pool = UpstreamPool(config, on_removed=router.forget)
        local = None if config.upstreams else LocalReplicas(config, config.replicas)
        async with httpx.AsyncClient(timeout=_timeouts(config), limits=_unbounded()) as client:
            try:
                started = time.monotonic()
                if local is not None:
                    pool.set_urls(local.start())
                    await local.wait_ready(pool, client, config.startup_timeout_s)
                # No model here: the gauge says how long the fleet took to be ready.
                observability.metrics.model_load.set(time.monotonic() - started)
                async with polling(pool, client):
                    proxy = Proxy(pool, router, client, lifecycle, config.upstream_api_key)
                    cache = make_answer_cache(config, config.served_model_name)
                    watch_load(proxy, observability.metrics)
                    observability.watch(
                        UpstreamCollector(pool),
                        AdmissionCollector(proxy),
                        CacheCollector(None, cache),
                    )
                    app.state.fleet = Fleet(proxy, cache, observability.metrics)
                    async with lifecycle.serving(proxy):
                        yield
            finally:
                if local is not None:
                    local.stop()

    routes = [
        *api_routes(),
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", fleet_readiness(lifecycle, config), methods=["GET"]),
        *observability.routes,
        *(r for r in lifecycle.routes if r.path != "/health/ready"),  # (the fleet's, above)
        *live.routes(fleet),  # GET /debug/engine: the replicas' pages side by side
    ]
    middleware = [
        *observability.middleware,
        Middleware(BodyLimitMiddleware, limit=config.max_body_bytes),
        *lifecycle.middleware,
        Middleware(ErrorBoundary),  # innermost, as common.app.create_app places it
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=frozen_after_startup(lifespan),
    )


@asynccontextmanager
async def polling(pool: UpstreamPool, client: httpx.AsyncClient):
    """The pool's readiness polls (and DNS look-ups), for as long as the router runs."""
    task = asyncio.create_task(pool.poll_forever(client))
    try:
        yield
    finally:
        task.cancel()


def _timeouts(config: Config) -> httpx.Timeout:
    """Connecting is quick or the replica is gone; an answer may be silent while it queues."""
    return httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)


def _unbounded() -> httpx.Limits:
    """No cap on connections: each request in flight holds one, and the engines admit. None
    kept alive between requests: a request sent on a kept connection to a replica that has just
    died fails like one the replica was working on, where a fresh connection is refused (and
    the request safely tried elsewhere). A local connect costs well under a millisecond."""
    return httpx.Limits(max_connections=None, max_keepalive_connections=0)


# ---------------------------------------------------------------- routes


def api_routes() -> list[Route]:
    """The OpenAI API and the tokenizer, each request forwarded to a replica."""
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/tokenize", tokenizer_route, methods=["POST"]),
        Route("/detokenize", tokenizer_route, methods=["POST"]),
    ]


def fleet(http: HTTPRequest) -> Fleet:
    state = getattr(http.app.state, "fleet", None)
    if state is None:
        raise APIError("the router is starting", status=503, code="not_ready")
    return state


async def chat_completions(http: HTTPRequest) -> Response:
    return await generate(http, "/v1/chat/completions", protocol.parse_chat_request)


async def completions(http: HTTPRequest) -> Response:
    return await generate(http, "/v1/completions", protocol.parse_completion_request)


async def generate(http: HTTPRequest, path: str, parse) -> Response:
    """Validate (a bad request never reaches a replica), admit, try the cache, forward; one
    outcome per request, counted by its RequestLog whichever way it ends."""
    state = fleet(http)
    done = RequestLog(state.metrics, http.headers.get(REQUEST_ID))
    try:
        response = await _generate(http, state, path, parse, done)
    except ClientDisconnect:  # gone while still sending its body
        done.end(Outcome.CANCELLED, 499)
        return Response(status_code=499)
    except APIError as exc:
        done.end(Outcome.for_status(exc.status), exc.status)
        raise
    except Exception:
        done.end(Outcome.SERVER_ERROR, 500)
        raise
    if not isinstance(response, StreamingResponse):  # (a stream ends when it is relayed)
        status = response.status_code
        outcome = Outcome.SUCCESS if status == 200 else Outcome.for_status(status)
        done.end(Outcome.CANCELLED if status == 499 else outcome, status)
    return response


async def _generate(http: HTTPRequest, state: Fleet, path: str, parse, done) -> Response:
    body = await http.body()
    request = await off_loop(parse, body)  # a large body is parsed off the event loop
    state.proxy.admit()
    no_cache = any(word in http.headers.get("cache-control", "").lower() for word in NO_CACHE)
    key = state.cache.answer_key(path, body, request, no_cache) if state.cache else None
    if state.cache is not None and key is not None:
        cached = await state.cache.get_answer(key)
        if cached is not None:
            return Response(cached, media_type="application/json", headers={"X-Cache": "hit"})
    forwarding = state.proxy.forward(http, path, body, prompt_text(request), done)
    response = await until_disconnect(http, forwarding)
    if response is None:  # the client left; the replica saw its connection close
        return Response(status_code=499)
    if state.cache is not None and key is not None and response.status_code == 200:
        await state.cache.put_answer(key, response.body)
        response.headers["X-Cache"] = "miss"
    return response


async def models(http: HTTPRequest) -> Response:
    return await fleet(http).proxy.get("/v1/models")


async def tokenizer_route(http: HTTPRequest) -> Response:
    """/tokenize and /detokenize: every replica serves the same model; one of them answers."""
    return await fleet(http).proxy.get(http.url.path, await http.body())


async def health(http: HTTPRequest) -> Response:
    """200 while at least one replica is ready; the body lists every replica's state."""
    pool = fleet(http).proxy.pool
    upstreams = {
        u.name: {"ready": u.ready, "outstanding": u.outstanding} for u in pool.upstreams.values()
    }
    ready = any(u["ready"] for u in upstreams.values())
    status = {"status": "ok" if ready else "no replica ready", "upstreams": upstreams}
    return JSONResponse(status, status_code=200 if ready else 503)


def fleet_readiness(lifecycle: Lifecycle, config: Config):
    """GET /health/ready: ready means the router can serve: step 6's answer (started, not
    draining) and at least one replica ready. A router with none answers every request 503, so
    a load balancer (the Kubernetes Service) should send its clients elsewhere."""
    process_ready = readiness(lifecycle, config.ready_when_saturated)

    async def ready(http: HTTPRequest) -> JSONResponse:
        state = getattr(http.app.state, "fleet", None)
        if state is not None and not state.proxy.pool.ready():
            reason = {"status": "not ready", "reason": "no replica ready"}
            return JSONResponse(reason, status_code=503)
        return await process_ready(http)

    return ready


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
