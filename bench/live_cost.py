"""What does watching cost? Output tokens/s at N users, with and without the live page open.

    python -m bench.live_cost                          # starts step 7, 16 users, 3 pairs of rounds
    python -m bench.live_cost --step 8 --users 16 --seconds 60 --rounds 3 --publish live-cost-8
    python -m bench.live_cost --url http://127.0.0.1:8000 --api-key KEY

`users` clients send greedy completions (one shared system prompt, a question each) back to
back. Rounds come in pairs, in the order plain, watched, watched, plain, ... (ABBA), so that a
drift of the machine or the server over the run falls on both sides alike. A watched round has
one reader of GET /debug/engine/events (the stream the page reads; the page draws in the
browser, so to the server a reader of the stream is a page) in its own process, as a browser
is (`--read`): it counts the events' bytes and nothing more, so that its work is not the load
generator's.

Each round's numbers: output tokens finished in the window / its length; from the engine's
timeline (GET /debug/timeline), its iterations in the window, their mean time and rows, so that a
slower round shows as slower iterations (the forward pass disturbed) or as fewer rows (requests
arriving late); the server's CPU time per output token (when this command started the server);
and the share of the machine's CPU that other processes used (`foreign_cpu`), which must be near
0 for any of it to mean something.

`--publish NAME` writes bench/charts/NAME/results.json in the bench's format (the step, and
`STEP+page` for the watched rounds, at the users' level; the summary's `output_tok_s` the
median of the rounds) with the machine and the commit, so that a README quotes it with bench:fig
markers (bench/publish.py).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import httpx

from bench.measured import Entries, finish, target, valid_name
from bench.provenance import ForeignCpu
from bench.servers import ROOT, discover_steps, select_steps

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one short paragraph, "
    "politely, and mention the opening hours when they matter. "
) * 3
NO_CACHE = {"cache-control": "no-cache"}  # generated every time, never a cached answer
EVENTS = "/debug/engine/events"


def prompt(tag: str, user_index: int, n: int) -> str:
    """The n-th prompt of a user. Every round sends the same ones (`tag` is the run's), so that
    every round does the same work: a new tag a round changed how long the greedy answers ran
    (from 4 to 23 tokens a request on average), and with it the prompt work per output token."""
    return f"{SYSTEM}Question {tag}.{user_index}.{n}: when do you open?"


def round_order(pairs: int) -> list[bool]:
    """Watched or not, round by round: plain, watched, watched, plain, ... (ABBA)."""
    return [(i % 2 == 1) != (i // 2 % 2 == 1) for i in range(2 * pairs)]


async def user(client: httpx.AsyncClient, tag: str, i: int, until: float, max_tokens: int) -> int:
    """Requests back to back until `until`; the output tokens of those that ended by then.
    `Cache-Control: no-cache` keeps them from the response cache."""
    tokens, n = 0, 0
    while time.monotonic() < until:
        n += 1
        body = {"model": MODEL, "prompt": prompt(tag, i, n), "max_tokens": max_tokens,
                "temperature": 0}  # fmt: skip
        answer = await client.post("/v1/completions", json=body, headers=NO_CACHE)
        answer.raise_for_status()
        if time.monotonic() <= until:
            tokens += answer.json()["usage"]["completion_tokens"]
    return tokens


# ---------------------------------------------------------------- the reader, its own process


def read_feed(url: str, headers: dict[str, str]) -> int:
    """Reads the live feed until SIGTERM, counting events; prints `ready` after the first one
    and the count at the end (the parent reads both from its stdout)."""
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    events = 0
    with httpx.stream("GET", url + EVENTS, headers=headers, timeout=60) as stream:
        stream.raise_for_status()
        for chunk in stream.iter_raw():
            if events == 0 and b"data:" in chunk:
                print("ready", flush=True)
            events += chunk.count(b"\ndata:") + chunk.startswith(b"data:")
            if stop[0]:
                break
    print(events, flush=True)
    return 0


class Reader:
    """`python -m bench.live_cost --read URL` in a child process, started before a watched
    round's load and stopped after it."""

    def __init__(self, url: str, api_key: str) -> None:
        argv = [sys.executable, "-m", "bench.live_cost", "--read", "--url", url]
        self.proc = subprocess.Popen(
            [*argv, "--api-key", api_key] if api_key else argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":  # the first event arrived
            self.proc.kill()
            raise RuntimeError(f"the feed reader got no event from {url}{EVENTS}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return int(out.split()[-1])


# ---------------------------------------------------------------- one round


def engine_iterations(url: str, headers: dict, start: float, end: float) -> dict | None:
    """The engine's iterations that began in [start, end] (time.monotonic, this machine's):
    how many, their mean wall and CPU time, and their mean rows. None without a timeline."""
    try:
        trace = httpx.get(url + "/debug/timeline", headers=headers, timeout=60).json()
        origin = trace["otherData"]["origin_s"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    lo, hi = (start - origin) * 1e6, (end - origin) * 1e6
    its = [
        e for e in trace["traceEvents"]
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("iteration ")
        and lo <= e["ts"] <= hi
    ]  # fmt: skip
    if not its:
        return None
    return {
        "iterations": len(its),
        "iteration_ms": round(statistics.mean(e["dur"] for e in its) / 1e3, 2),
        "iteration_cpu_ms": round(statistics.mean(e["args"].get("cpu_ms", 0) for e in its), 2),
        "rows_per_iteration": round(statistics.mean(e["args"]["tokens"] for e in its), 2),
    }


async def load(url: str, headers: dict, args: argparse.Namespace, seconds: float) -> float:
    limits = httpx.Limits(max_connections=args.users + 4)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=300, limits=limits
    ) as client:
        until = time.monotonic() + seconds
        totals = await asyncio.gather(
            *(user(client, args.tag, i, until, args.max_tokens) for i in range(args.users))
        )
    return sum(totals) / seconds


def one_round(
    url: str, headers: dict, args: argparse.Namespace, watched: bool, server_cpu: Callable
) -> dict:
    reader = Reader(url, args.api_key) if watched else None
    foreign, cpu0 = ForeignCpu(server_cpu), server_cpu()
    start = time.monotonic()
    tok_s = asyncio.run(load(url, headers, args, args.seconds))
    end = time.monotonic()
    cpu = server_cpu() - cpu0
    events = reader.stop() if reader is not None else 0
    row = {"watched": watched, "output_tok_s": round(tok_s, 2), "events": events,
           "foreign_cpu": foreign.share()}  # fmt: skip
    if cpu > 0 and tok_s > 0:
        row["server_cpu_ms_per_token"] = round(cpu * 1e3 / (tok_s * args.seconds), 2)
    row.update(engine_iterations(url, headers, start, end) or {})
    return row


# ---------------------------------------------------------------- what is printed and kept


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"users {args.users}, {args.seconds:.0f} s a round, max_tokens {args.max_tokens}",
        "| page open | rounds | out tok/s median | each round | iteration ms | rows/iter |"
        " server CPU ms/token | other CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for watched in (False, True):
        side = [r for r in rows if r["watched"] is watched]
        each = ", ".join(f"{r['output_tok_s']:.1f}" for r in side)
        label = "yes (one feed reader)" if watched else "no"
        cells = [_median(side, k) for k in ("iteration_ms", "rows_per_iteration",
                                            "server_cpu_ms_per_token", "foreign_cpu")]  # fmt: skip
        lines.append(
            f"| {label} | {len(side)} | {_median(side, 'output_tok_s')} | {each} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _median(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.median(values):.2f}" if values else "-"


def entries(rows: list[dict], step: str, users: int) -> Entries:
    """One entry for each side, `STEP` and `STEP+page`, at the users' level; the summary holds
    the median of the rounds of every number all of that side's rounds have."""

    def side(watched: bool) -> dict[int, dict]:
        mine = [r for r in rows if r["watched"] is watched]
        summary = {
            key: statistics.median(r[key] for r in mine)
            for key in mine[0]
            if key != "watched" and all(r.get(key) is not None for r in mine)
        }
        return {users: {"summary": summary, "rounds": mine}}

    return {step: side(False), step + "+page": side(True)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.live_cost", description=__doc__)
    parser.add_argument("--step", default="7", help="the step to start (number or folder)")
    parser.add_argument("--url", default="", help="measure a running server instead")
    parser.add_argument("--api-key", default="", help="the server's key, if it has one")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of rounds (ABBA order)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of load first")
    parser.add_argument("--publish", default="", metavar="NAME", help="bench/charts/NAME")
    parser.add_argument("--read", action="store_true", help=argparse.SUPPRESS)  # the reader
    args = parser.parse_args(argv)
    if args.publish and not valid_name(args.publish):
        parser.error("--publish takes a folder name under bench/charts, like live-cost")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.read:
        return read_feed(args.url.rstrip("/"), headers)
    args.tag = uuid.uuid4().hex[:8]  # the run's: the same prompts in every round
    step = args.url or select_steps(discover_steps(), args.step)[0]
    rows = []
    with target(args.url, step, "live_cost") as (url, server):
        server_cpu = server.cpu_seconds if server is not None else (lambda: 0.0)
        asyncio.run(load(url, headers, args, args.warmup))  # not counted
        for watched in round_order(args.rounds):
            row = one_round(url, headers, args, watched, server_cpu)
            print(f"[live_cost] {row}", flush=True)
            rows.append(row)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "read")}
    found = entries(rows, step, args.users)
    finish("live_cost", argv, report(rows, args), args.publish, found, config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
