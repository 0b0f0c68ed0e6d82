"""The router's GET /debug/timeline: both pools' engines on one trace, so a hand-over reads
across it (the prefill engine's span of a request ends "handed over", the decode engine's span
of it starts: queued, then a prefill whose `cached` tokens are the blocks taken in).

The router holds no timeline of its own: it asks every engine for its /debug/timeline (Chrome
Trace Event JSON, common/timeline.py; the query, such as ?last=N, passed on, with the
`upstream_api_key`) and merges them: one process per engine, named by its pool (`prefill
HOST:PORT`, `decode HOST:PORT`), holding that engine's iterations track, its counters and one
track per request. Each trace counts its microseconds from its own first event and names that
event's time.monotonic() (`otherData.origin_s`); the merge puts every trace on the earliest
origin. That clock is the machine's: engines on one machine (the local ones) line up exactly,
engines on different machines do not (each row is right, the offset between rows is not).

An engine that cannot answer (gone, or keeping no timeline) is left out and named in
`otherData.missing`; with none answering the route answers 502.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.errors import APIError
from step9_router.proxy import Proxy
from step9_router.upstreams import Upstream

Trace = dict[str, Any]


def routes(pools_of: Callable[[HTTPRequest], dict[str, Proxy]]) -> list[Route]:
    """`pools_of(http)`: the running router's proxies by role ("prefill", "decode")."""

    async def timeline(http: HTTPRequest) -> Response:
        engines = [
            (f"{role} {upstream.name}", proxy, upstream)
            for role, proxy in pools_of(http).items()
            for upstream in sorted(proxy.pool.upstreams.values(), key=lambda u: u.name)
        ]
        query = http.url.query
        answers = await asyncio.gather(*(_fetch(p, u, query) for _, p, u in engines))
        named = [(name, answer) for (name, _, _), answer in zip(engines, answers, strict=True)]
        traces = {name: answer for name, answer in named if isinstance(answer, dict)}
        missing = {name: answer for name, answer in named if isinstance(answer, str)}
        if not traces:
            raise APIError(f"no engine's timeline could be had: {missing}", 502)
        merged = merge(traces)
        merged["otherData"]["missing"] = missing
        return JSONResponse(merged)

    return [Route("/debug/timeline", timeline, methods=["GET"])]


async def _fetch(proxy: Proxy, upstream: Upstream, query: str) -> Trace | str:
    """An engine's trace, or why there is none."""
    url = f"{upstream.url}/debug/timeline" + (f"?{query}" if query else "")
    try:
        response = await proxy.client.get(url, headers=proxy.auth)
    except httpx.HTTPError as exc:
        return f"unreachable: {type(exc).__name__}"
    if response.status_code != 200:
        return f"answered {response.status_code}"
    try:
        trace = response.json()
        float(trace["otherData"]["origin_s"])
    except (ValueError, KeyError, TypeError):
        return "answered no trace with an origin"
    return trace


def merge(traces: dict[str, Trace]) -> Trace:
    """One trace of several engines' traces, by the engine's name: one process each (pid 1, 2,
    ... in the order given), every timestamp moved onto the earliest origin."""
    origin = min(float(t["otherData"]["origin_s"]) for t in traces.values())
    events: list[dict] = []
    for pid, (name, trace) in enumerate(traces.items(), start=1):
        shift = round((float(trace["otherData"]["origin_s"]) - origin) * 1e6, 1)  # us
        events += [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}},
            {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
             "args": {"sort_index": pid}},
        ]  # fmt: skip
        events += [_moved(e, pid, shift) for e in trace["traceEvents"] if not _process_name(e)]
    other = {"clock": "time.monotonic", "origin_s": origin, "engines": list(traces)}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def _process_name(event: dict) -> bool:
    return event.get("ph") == "M" and event.get("name") == "process_name"


def _moved(event: dict, pid: int, shift: float) -> dict:
    """An engine's event in the merged trace: its engine's process, the common time axis.
    An engine's own two processes (its iterations, its requests) become one: their tracks do
    not collide (the iterations are track 0, the requests 1 and up)."""
    moved = {**event, "pid": pid}
    if event.get("ph") != "M":
        moved["ts"] = round(event["ts"] + shift, 1)
    return moved
