"""What does watching cost? Output tokens/s at N users, with and without the live page open.

    python -m bench.live_cost                          # starts step 7, 16 users, 3 rounds each
    python -m bench.live_cost --step 8 --users 16 --seconds 60 --rounds 3
    python -m bench.live_cost --url http://127.0.0.1:8000 --api-key KEY

`users` clients send greedy completions (one shared system prompt, a question each) back to
back. Rounds alternate: nobody watching, then one watcher reading GET /debug/engine/events (the
stream the page reads; the page draws in the browser, so to the server a reader of the stream
is a page), so slow drift of the machine falls on both sides alike. Each round's number is
output tokens finished in the window / its length. A quiet machine is needed: on a shared one
the difference is lost in the noise, and the table says only that.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.servers import StepServer, discover_steps, select_steps

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one short paragraph, "
    "politely, and mention the opening hours when they matter. "
) * 3


NO_CACHE = {"cache-control": "no-cache"}  # generated every time, never a cached answer


async def user(client: httpx.AsyncClient, tag: str, i: int, until: float, max_tokens: int) -> int:
    """Requests back to back until `until`; the output tokens of those that ended by then.
    Every round sends the same prompts (`tag` is the run's), so that every round does the same
    work: a new tag a round changed how long the greedy answers ran (from 4 to 23 tokens a
    request on average), and with it the prompt work per output token. `Cache-Control: no-cache`
    keeps them from the response cache."""
    tokens, n = 0, 0
    while time.monotonic() < until:
        n += 1
        body = {"model": MODEL, "prompt": f"{SYSTEM}Question {tag}.{i}.{n}: when do you open?",
                "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
        answer = await client.post("/v1/completions", json=body, headers=NO_CACHE)
        answer.raise_for_status()
        if time.monotonic() <= until:
            tokens += answer.json()["usage"]["completion_tokens"]
    return tokens


async def watcher(client: httpx.AsyncClient, events: list[int]) -> None:
    """Reads the live feed like the page does, counting its events, until cancelled."""
    async with client.stream("GET", "/debug/engine/events") as stream:
        stream.raise_for_status()
        async for line in stream.aiter_lines():
            events[0] += line.startswith("data:")


async def one_round(url: str, headers: dict, args: argparse.Namespace, watched: bool) -> dict:
    limits = httpx.Limits(max_connections=args.users + 4)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=300, limits=limits
    ) as client:
        events, tag = [0], args.tag
        watch = asyncio.create_task(watcher(client, events)) if watched else None
        start = time.monotonic()
        until = start + args.seconds
        totals = await asyncio.gather(
            *(user(client, tag, i, until, args.max_tokens) for i in range(args.users))
        )
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
    return {"watched": watched, "tok_s": sum(totals) / args.seconds, "events": events[0]}


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"users {args.users}, {args.seconds:.0f} s a round, max_tokens {args.max_tokens}",
        "| page open | rounds | out tok/s median | each round |",
        "| --- | --- | --- | --- |",
    ]
    for watched in (False, True):
        each = [r["tok_s"] for r in rows if r["watched"] is watched]
        rounds = ", ".join(f"{x:.1f}" for x in each)
        label = "yes (one feed reader)" if watched else "no"
        lines.append(f"| {label} | {len(each)} | {statistics.median(each):.1f} | {rounds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live_cost", description=__doc__)
    parser.add_argument("--step", default="7", help="the step to start (number or folder)")
    parser.add_argument("--url", default="", help="measure a running server instead")
    parser.add_argument("--api-key", default="", help="the server's key, if it has one")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of load first")
    args = parser.parse_args(argv)
    args.tag = uuid.uuid4().hex[:8]  # the run's: the same prompts in every round
    server, url = None, args.url.rstrip("/")
    if not url:
        (step,) = select_steps(discover_steps(), args.step)
        log = Path(tempfile.mkdtemp(prefix="live-cost-")) / f"{step}.log"
        print(f"[live_cost] starting {step} (log: {log})", flush=True)
        server = StepServer(step, "float32", log)
        server.wait_ready(300)
        url = server.url
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = []
    try:
        warmup = argparse.Namespace(**{**vars(args), "seconds": args.warmup})
        asyncio.run(one_round(url, headers, warmup, watched=False))  # not counted
        for i in range(2 * args.rounds):
            row = asyncio.run(one_round(url, headers, args, watched=i % 2 == 1))
            print(f"[live_cost] {row}", flush=True)
            rows.append(row)
    finally:
        if server is not None:
            server.stop()
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
