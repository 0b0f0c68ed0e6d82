"""GET /debug/engine: the engine as it runs, in the browser.

One static page (live_page.html: plain HTML, canvas and a few lines of JavaScript, nothing
fetched from anywhere else) draws what `engine_snapshot` reads from the engine's own state: the
KV pool as a map of blocks (free, cached, in use, shared with their reference counts), the
running and waiting sequences with their block tables, the last iterations' batch composition as
a moving strip (the timeline's ring), and the counters /metrics also reports (prefix-cache hits,
preemptions, blocks in use).

- GET /debug/engine: the page. GET /debug/engine/sources: the feeds it shows, one panel each (one
  here; step 9's router lists its engines). GET /debug/engine/events: the feed, server-sent
  events, one snapshot every `INTERVAL_S`.
- The key: these are /debug/ routes, behind step 6's API key like /debug/timeline. A browser
  cannot send a header when it opens a page, so the page may be opened with
  `?access_token=KEY` (RFC 6750's query form, accepted on GET /debug/ only); the page then sends
  the key as a header for its events and takes it out of the address bar.
- Cost: nothing is read while nobody watches (the snapshot is taken by the stream's loop). However
  many watch, one snapshot is taken per interval and shared (`LiveFeed`), and at most
  `MAX_WATCHERS` streams are open: one more gets a 429.

Threads: the event loop owns the scheduler, the block manager and the requests (engine.py), and
the streams run on it too, so a snapshot reads them whole without a lock; the worker thread's
forward pass changes none of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.api import serving
from common.errors import APIError
from common.timeline import Iteration, Timeline
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.sequence import Sequence

PAGE = Path(__file__).with_name("live_page.html")
INTERVAL_S = 0.2  # 5 snapshots a second: the strip moves smoothly; ~1.5 ms each (README)
MAX_WATCHERS = 8  # open event streams per server
SHOWN_SEQUENCES = 64  # rows of each table (running, waiting); the counts are always whole
SHOWN_ITERATIONS = 32  # the strip's newest columns in each snapshot (the page keeps more)
STEP_KINDS = {"prefill": "p", "decode": "d", "verify": "v", "fork": "f", "padding": "x"}
# BLOCK_CODES[reference count, 10 for more than 9][named]: a table, not a call per block (a
# snapshot reads every block of the pool, 2048 by default).
BLOCK_CODES = [(".", "c"), ("u", "n"), *((str(k), str(k)) for k in range(2, 10)), ("+", "+")]

# msgspec encodes a snapshot (about 20 KB at 16 users) in a tenth of json.dumps's time: 0.09
# against 1.2 ms measured, on the event loop that also serves the requests.
_ENCODE = msgspec.json.Encoder().encode
Snapshot = Callable[[Any], dict[str, Any]]  # engine -> what the page draws


# ---------------------------------------------------------------- what the page is sent


def engine_snapshot(engine: Any) -> dict[str, Any]:
    """The engine's state now, as plain JSON-ready values (read on the event loop)."""
    scheduler, blocks = engine.scheduler, engine.blocks
    load = engine.load()
    return {
        "pool": pool_map(blocks),
        "block_size": blocks.block_size,
        "running": [sequence_view(s) for s in islice(scheduler.running, SHOWN_SEQUENCES)],
        "waiting": [sequence_view(s) for s in islice(scheduler.waiting, SHOWN_SEQUENCES)],
        "iterations": recent_iterations(engine.timeline),
        "counters": {
            "iteration": last_iteration(engine.timeline),
            "running": load.running,
            "waiting": load.waiting,
            "kv_blocks_used": blocks.num_blocks - blocks.num_free,
            "kv_blocks_total": blocks.num_blocks,
            "prefix_queried_tokens": blocks.stats.queried_tokens,
            "prefix_hit_tokens": blocks.stats.hit_tokens,
            "prefix_evictions": blocks.stats.evictions,
            "preemptions": scheduler.num_preemptions,
        },
    }


def pool_map(blocks: BlockManager) -> str:
    """One character per block, in block-id order: '.' free, 'c' free but its prefix still
    findable (cached), 'u' in use by one sequence, 'n' in use and named (full, findable by the
    next prompt with that prefix), '2'-'9' shared by that many, '+' by more."""
    return "".join(
        BLOCK_CODES[min(count, 10)][name is not None]
        for count, name in zip(blocks.ref_counts, blocks.block_hash, strict=True)
    )


def sequence_view(seq: Sequence) -> dict[str, Any]:
    request = seq.request
    return {
        "id": request.trace_id,
        "prompt": request.num_prompt_tokens,
        "tokens": seq.num_tokens,
        "computed": seq.num_computed,
        "blocks": seq.block_table,
        "preemptions": seq.num_preemptions,
    }


def recent_iterations(timeline: Timeline | None) -> list[dict[str, Any]]:
    """The newest iterations of the timeline's ring, oldest first: each step as
    [kind letter, tokens, request id]."""
    if timeline is None:
        return []
    newest = list(islice(reversed(timeline.iterations), SHOWN_ITERATIONS))
    return [_iteration_view(it) for it in reversed(newest)]


def _iteration_view(it: Iteration) -> dict[str, Any]:
    return {
        "n": it.number,
        "ms": round(it.duration * 1e3, 2),
        "budget": it.budget,
        "steps": [[STEP_KINDS.get(s.kind, "?"), s.tokens, s.request_id] for s in it.steps],
        "preempted": len(it.preempted),
        "finished": len(it.finished),
        "kv_used": it.kv_used,
    }


def last_iteration(timeline: Timeline | None) -> int:
    return timeline.iterations[-1].number if timeline is not None and timeline.iterations else 0


# ---------------------------------------------------------------- the feed


class LiveFeed:
    """One snapshot per interval, shared by every watcher; none taken while nobody watches.
    Runs on the event loop: the count and the cached snapshot need no lock."""

    def __init__(
        self,
        interval_s: float = INTERVAL_S,
        max_watchers: int = MAX_WATCHERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s, self.max_watchers, self.clock = interval_s, max_watchers, clock
        self.watchers = 0
        self.snapshots_taken = 0
        self._latest: tuple[float, str] = (-float("inf"), "")

    def current(self, take: Callable[[], dict[str, Any]]) -> str:
        """The shared snapshot as JSON, taken anew once the last one is an interval old."""
        taken_at, payload = self._latest
        now = self.clock()
        if now - taken_at >= self.interval_s * 0.9:  # a little early, or ticks alternate
            payload = _ENCODE({"at": time.time(), **take()}).decode()
            self._latest = (now, payload)
            self.snapshots_taken += 1
        return payload

    def open(self) -> None:
        """Count a new watcher, or refuse it (429) when MAX_WATCHERS are already open."""
        if self.watchers >= self.max_watchers:
            raise APIError(
                f"{self.max_watchers} pages are watching this engine already; try later",
                429,
                code="too_many_watchers",
            )
        self.watchers += 1

    async def stream(self, take: Callable[[], dict[str, Any]]) -> AsyncGenerator[str, None]:
        """Server-sent events until the client leaves (the write fails and the response
        closes this generator). `open` was called for it."""
        try:
            yield f"retry: {int(self.interval_s * 10_000)}\n\n"  # reconnect after 10 intervals
            while True:
                yield f"data: {self.current(take)}\n\n"
                await asyncio.sleep(self.interval_s)
        finally:
            self.watchers -= 1


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_stream(feed: LiveFeed, take: Callable[[], dict[str, Any]]) -> Response:
    feed.open()
    return StreamingResponse(feed.stream(take), media_type="text/event-stream", headers=SSE_HEADERS)


async def page(http: HTTPRequest) -> Response:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


def routes(snapshot: Snapshot = engine_snapshot, feed: LiveFeed | None = None) -> list[Route]:
    """The page, its one source (this server's engine) and the events. `snapshot` reads the
    engine; a later step passes its own to show more."""
    feed = feed or LiveFeed()

    async def sources(http: HTTPRequest) -> Response:
        return JSONResponse([{"name": "engine", "events": "engine/events"}])

    async def events(http: HTTPRequest) -> Response:
        engine = serving(http).engine
        return event_stream(feed, lambda: snapshot(engine))

    return [
        Route("/debug/engine", page, methods=["GET"]),
        Route("/debug/engine/sources", sources, methods=["GET"]),
        Route("/debug/engine/events", events, methods=["GET"]),
    ]
