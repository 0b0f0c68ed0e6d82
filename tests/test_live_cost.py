"""bench.live_cost, the measurement of what an open live page costs: its rounds do the same work,
in an order that cancels drift, its reader is a process of its own, and what it publishes is
readable by the READMEs' figure markers."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench import live_cost, publish
from bench.measured import publish_measurement


def test_rounds_alternate_abba() -> None:
    order = live_cost.round_order(3)
    assert order == [False, True, True, False, False, True]
    assert order.count(True) == order.count(False) == 3


def test_every_round_sends_the_same_prompts_past_the_response_cache() -> None:
    seen: list[list[str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["cache-control"] == "no-cache"
        seen[-1].append(json.loads(request.content)["prompt"])
        return httpx.Response(200, json={"usage": {"completion_tokens": 3}})

    async def one_round() -> int:
        seen.append([])
        async with httpx.AsyncClient(
            base_url="http://x", transport=httpx.MockTransport(answer)
        ) as client:
            return await live_cost.user(client, "run1", 0, time.monotonic() + 0.05, 8)

    tokens = [asyncio.run(one_round()) for _ in range(2)]
    assert tokens[0] > 0
    n = min(len(seen[0]), len(seen[1]))
    assert n >= 2 and seen[0][:n] == seen[1][:n]
    assert len(set(seen[0])) == len(seen[0])  # a new question each request, within a round


def test_published_run_is_read_by_figure_markers(tmp_path) -> None:
    args = argparse.Namespace(users=16, seconds=60.0, max_tokens=64, tag="t")
    rows = [
        {"watched": False, "output_tok_s": 100.0, "events": 0, "foreign_cpu": 0.01},
        {"watched": True, "output_tok_s": 90.0, "events": 300, "foreign_cpu": 0.02},
        {"watched": True, "output_tok_s": 94.0, "events": 300, "foreign_cpu": 0.0},
        {"watched": False, "output_tok_s": 104.0, "events": 0, "foreign_cpu": 0.0},
    ]
    found = live_cost.entries(rows, "step7_real_kv", args.users)
    table = live_cost.report(rows, args)
    publish_measurement("lc", found, table, "python -m bench.live_cost", {}, root=tmp_path)
    ratio = "lc step7_real_kv+page@16/step7_real_kv@16 output_tok_s .3f"
    assert publish.figure(ratio, root=tmp_path) == "0.902"  # medians 92 / 102
    assert publish.figure("lc step7_real_kv@16 output_tok_s", root=tmp_path) == "102.0"
    table = (tmp_path / "bench/charts/lc/table.md").read_text()
    assert "| yes (one feed reader) | 2 | 92.00 |" in table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def feed_url():
    """A server whose /debug/engine/events sends an event every 20 ms, like the live feed."""

    async def events(request):
        async def stream():
            while True:
                yield 'data: {"n":1}\n\n'
                await asyncio.sleep(0.02)

        return StreamingResponse(stream(), media_type="text/event-stream")

    app = Starlette(routes=[Route(live_cost.EVENTS, events)])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_reader_is_its_own_process_and_counts_events(feed_url) -> None:
    reader = live_cost.Reader(feed_url, api_key="")
    assert reader.proc.pid is not None and reader.proc.poll() is None
    time.sleep(0.3)
    assert reader.stop() >= 5
    assert reader.proc.returncode == 0
