"""The disaggregated router's GET /debug/engine: both pools' engines side by side.

Step 9's page and relay (step9_router/live.py), over two pools: each panel is named by the part
its engine plays (prefill or decode). A prompt's blocks show in the prefill engine's pool while
their lease holds them, and in the decode engine's once taken in.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.errors import APIError
from step7_real_kv import live
from step9_router.live import relay_events
from step9_router.proxy import Proxy


def routes(pools_of: Callable[[HTTPRequest], dict[str, Proxy]]) -> list[Route]:
    """`pools_of(http)`: the running router's proxies by role ("prefill", "decode")."""

    async def sources(http: HTTPRequest) -> Response:
        found = [
            {"name": f"{role} {name}", "events": f"engine/events?replica={name}"}
            for role, proxy in pools_of(http).items()
            for name in sorted(u.name for u in proxy.pool.upstreams.values())
        ]
        return JSONResponse(found)

    async def events(http: HTTPRequest) -> Response:
        name = http.query_params.get("replica", "")
        for proxy in pools_of(http).values():
            if any(u.name == name for u in proxy.pool.upstreams.values()):
                return await relay_events(proxy, name)
        raise APIError(f"no engine '{name}'", 404, param="replica", code="no_such_replica")

    return [
        Route("/debug/engine", live.page, methods=["GET"]),
        Route("/debug/engine/sources", sources, methods=["GET"]),
        Route("/debug/engine/events", events, methods=["GET"]),
    ]
