"""The router's GET /debug/engine: its engines side by side, each one live.

The router holds no engine; its page is step 7's (step7_real_kv/live_page.html) with one panel
per replica. `/debug/engine/sources` lists the replicas the pool knows, and
`/debug/engine/events?replica=HOST:PORT` relays that replica's own feed (its
/debug/engine/events, with the `upstream_api_key`), so the browser needs to reach only the
router. Each watcher holds one stream on each engine it shows; every engine caps its own watchers,
and its 429 comes back as the router's answer. A replica without the page (step 6, vLLM)
answers 404, and its panel says so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.errors import APIError
from step7_real_kv import live
from step9_router.proxy import Proxy


def routes(proxy_of: Callable[[HTTPRequest], Any]) -> list[Route]:
    """`proxy_of(http)`: the running router's Proxy (its pool, client and key)."""

    async def sources(http: HTTPRequest) -> Response:
        proxy: Proxy = proxy_of(http).proxy
        names = sorted(u.name for u in proxy.pool.upstreams.values())
        return JSONResponse([{"name": n, "events": f"engine/events?replica={n}"} for n in names])

    async def events(http: HTTPRequest) -> Response:
        proxy: Proxy = proxy_of(http).proxy
        return await relay_events(proxy, http.query_params.get("replica", ""))

    return [
        Route("/debug/engine", live.page, methods=["GET"]),
        Route("/debug/engine/sources", sources, methods=["GET"]),
        Route("/debug/engine/events", events, methods=["GET"]),
    ]


async def relay_events(proxy: Proxy, name: str) -> Response:
    upstream = next((u for u in proxy.pool.upstreams.values() if u.name == name), None)
    if upstream is None:
        raise APIError(f"no replica '{name}'", 404, param="replica", code="no_such_replica")
    request = proxy.client.build_request(
        "GET", upstream.url + "/debug/engine/events", headers=proxy.auth
    )
    try:
        response = await proxy.client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise APIError(f"replica {name} unreachable: {type(exc).__name__}", 502) from exc
    if response.status_code != 200:
        body = await response.aread()
        await response.aclose()
        return Response(body, response.status_code, media_type="application/json")
    return StreamingResponse(
        _relayed(response), media_type="text/event-stream", headers=live.SSE_HEADERS
    )


async def _relayed(response: httpx.Response) -> AsyncIterator[bytes]:
    """The replica's events as they come; when the browser leaves, the replica's stream is
    closed too (this generator is closed, and with it the response)."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()
