"""Step 10, the disaggregated router: prompts are prefilled on one pool of engines, answers
decoded on another, and the prompt's KV blocks handed from one to the other.

New since step 9: two pools instead of one (by default one local prefill engine and one local
decode engine, step 10's engine_server, a thread each), and each request goes through both
(proxy.py): prefill for its first token and KV, decode for the answer, which pulls the blocks
from the prefill engine (http_connector.py). The router's parts are step 9's.
Run: python -m step10_disaggregated
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.app import ErrorBoundary, frozen_after_startup
from common.config import ConfigPart, knob
from common.errors import EXCEPTION_HANDLERS, APIError
from step5_observability.metrics import CacheCollector, watch_load
from step5_observability.observability import Observability
from step6_backpressure.admission import AdmissionCollector, BodyLimitMiddleware
from step6_backpressure.lifecycle import Lifecycle, serve_gracefully
from step9_router import server as step9
from step9_router.answer_cache import make_answer_cache
from step9_router.proxy import Proxy
from step9_router.routing import Router
from step9_router.upstreams import UpstreamCollector, UpstreamPool
from step10_disaggregated import live, timelines
from step10_disaggregated.engine import TransferConfig
from step10_disaggregated.proxy import DisaggProxy, PrefillCollector
from step10_disaggregated.replicas import LocalEngines


@dataclass(frozen=True)
class PoolsConfig(ConfigPart):
    prefill_upstreams: str = knob(
        "", "prefill engines: URLs, comma-separated, or dns://NAME:PORT; empty: start local ones"
    )
    decode_upstreams: str = knob("", "decode engines, the same way")
    prefill_replicas: int = knob(1, "local prefill engines when prefill_upstreams is empty")
    decode_replicas: int = knob(1, "local decode engines when decode_upstreams is empty")
    local_prefill_chars: int = knob(
        2000,
        "prompts up to this many characters (about 4 a token) are prefilled by the decode "
        "engine itself, not handed over; 0: every prompt goes through the prefill pool",
    )

    decode_prefill_chunk: int = knob(
        4,
        "prefill_chunk_while_decoding of the local decode engines: the prompt tokens (the "
        "short prompts they prefill, a handed-over prompt's last block) an iteration runs "
        "beside the decoding streams; 0: the engine's own budget",
    )
    decode_speculative_tokens: int = knob(
        0,
        "num_speculative_tokens of the local decode engines: their drafted rows lengthen "
        "every stream's iteration, and steady inter-token latency is the decode pool's job",
    )
    prefill_nice: int = knob(
        10,
        "niceness of the local prefill engines: on shared cores the scheduler runs the decode "
        "engine first, the prompts take the rest; 0: equal",
    )
    kv_transport: str = knob(
        "shm",
        "how the local decode engines fetch the blocks: shm (a file of /dev/shm: both pools "
        "local, on this machine) | http; with either pool given by URL, http",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.prefill_replicas, self.decode_replicas) < 1:
            raise ValueError("prefill_replicas and decode_replicas must be at least 1")
        if self.local_prefill_chars < 0:
            raise ValueError("local_prefill_chars must be >= 0")
        if self.decode_prefill_chunk < 0:
            raise ValueError("decode_prefill_chunk must be >= 0")
        if self.decode_speculative_tokens < 0:
            raise ValueError("decode_speculative_tokens must be >= 0")
        if not 0 <= self.prefill_nice <= 19:
            raise ValueError("prefill_nice must be between 0 and 19")


@dataclass(frozen=True)
class Config(PoolsConfig, TransferConfig, step9.Config):
    """Step 10: step 9's knobs (`upstreams` and `replicas` give way to the two pools'), and the
    transfer's lease and failure policy (the engines it starts get them too)."""


@dataclass
class Pool:
    """One pool: its engines, the routing among them, and step 9's proxy to them."""

    upstreams: UpstreamPool
    proxy: Proxy


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    lifecycle = lifecycle or Lifecycle(config)
    observability = Observability(config)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        local = LocalEngines(config)
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                httpx.AsyncClient(timeout=step9._timeouts(config), limits=step9._unbounded())
            )
            stack.callback(local.stop)
            started = time.monotonic()
            pools = [
                pool(config, role, spec, client, lifecycle, local)
                for role, spec in (
                    ("prefill", config.prefill_upstreams),
                    ("decode", config.decode_upstreams),
                )
            ]
            await local.wait_ready([p.upstreams for p in pools], client, config.startup_timeout_s)
            observability.metrics.model_load.set(time.monotonic() - started)
            for p in pools:
                await stack.enter_async_context(step9.polling(p.upstreams, client))
            proxy = DisaggProxy(
                pools[0].proxy,
                pools[1].proxy,
                config.kv_transfer_failure,
                config.local_prefill_chars,
            )
            cache = make_answer_cache(config, config.served_model_name)
            watch_load(proxy, observability.metrics)
            observability.watch(
                *(UpstreamCollector(p.upstreams) for p in pools),
                AdmissionCollector(proxy),
                PrefillCollector(proxy),
                CacheCollector(None, cache),
            )
            app.state.fleet = step9.Fleet(proxy, cache, observability.metrics)  # type: ignore[arg-type]
            app.state.pools = {"prefill": pools[0].upstreams, "decode": pools[1].upstreams}
            app.state.pool_proxies = {"prefill": pools[0].proxy, "decode": pools[1].proxy}
            async with lifecycle.serving(proxy):
                yield

    routes = [
        *step9.api_routes(),
        Route("/health", health, methods=["GET"]),
        *observability.routes,
        *lifecycle.routes,
        *live.routes(pool_proxies),  # GET /debug/engine: both pools' engines side by side
        *timelines.routes(pool_proxies),  # GET /debug/timeline: both engines on one trace
    ]
    middleware = [
        *observability.middleware,
        Middleware(BodyLimitMiddleware, limit=config.max_body_bytes),
        *lifecycle.middleware,
        Middleware(ErrorBoundary),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=frozen_after_startup(lifespan),
    )


def pool_proxies(http: HTTPRequest) -> dict[str, Proxy]:
    proxies = getattr(http.app.state, "pool_proxies", None)
    if proxies is None:
        raise APIError("the router is starting", status=503, code="not_ready")
    return proxies


def pool(config: Config, role: str, spec: str, client, lifecycle, local: LocalEngines) -> Pool:
    """A pool of `role` engines: the URLs given, or local engines started now."""
    router = Router(config)
    upstreams = UpstreamPool(dataclasses.replace(config, upstreams=spec), router.forget)
    if not spec:
        upstreams.set_urls(local.start(role))
    return Pool(upstreams, Proxy(upstreams, router, client, lifecycle, config.upstream_api_key))


async def health(http: HTTPRequest) -> Response:
    """200 while each pool has a ready engine; the body lists every engine's state."""
    pools = getattr(http.app.state, "pools", {})
    body: dict = {role: _states(p) for role, p in pools.items()}
    ready = len(pools) == 2 and all(p.ready() for p in pools.values())
    body["status"] = "ok" if ready else "a pool has no engine ready"
    return JSONResponse(body, status_code=200 if ready else 503)


def _states(pool: UpstreamPool) -> dict:
    upstreams = pool.upstreams.values()
    return {u.name: {"ready": u.ready, "outstanding": u.outstanding} for u in upstreams}


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
