"""Does any request stall the others? Healthy streams, timed token by token, while abuse arrives.

    python -m bench.stall --step 7                       # every kind of abuse, one after another
    python -m bench.stall --step 7 --abuse big-prompts   # one kind
    python -m bench.stall --url http://127.0.0.1:8000    # a server that is already running

Three greedy streams run for the whole measurement; each records the time of every chunk it
receives. Meanwhile one kind of abuse is sent, all at once:

- big-prompts: 12 chat requests of about 1 MB of text each (valid JSON, refused for length);
- many-messages: 6 chat requests of about 28,000 tiny messages each (0.98 MB, under the body
  limit, refused for length once templated);
- half-open: 400 connections that send the headers and half of a body, then nothing.

The number reported is the largest gap between two chunks of a healthy stream while the abuse
was in flight (and, for comparison, the largest gap of the same streams without abuse). The
goal: under 250 ms each time.

`--publish NAME` writes bench/charts/NAME/results.json (bench/measured.py): an entry for each
abuse, `STEP:ABUSE`, at the level of the streams' count (3), whose summary holds the row printed
for it (`largest_gap_s`, `largest_gap_quiet_s`, `token_s`, and `gap_engine` and
`quiet_gap_engine`, what the engine's iterations covered of each gap), so that a README quotes
`<!-- bench:fig NAME step7_real_kv:half-open@3 largest_gap_ms .0f -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

from bench.measured import Entries, finish, target, valid_name
from bench.servers import discover_steps, select_steps

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ABUSES = ("big-prompts", "many-messages", "half-open")
STREAMS = 3  # healthy streams in every measurement


@dataclass
class Stream:
    """One healthy stream: the arrival time of each chunk."""

    times: list[float] = field(default_factory=list)

    def gaps(self, start: float, end: float) -> list[float]:
        """The intervals between two chunks that both arrived inside [start, end]."""
        inside = [t for t in self.times if start <= t <= end]
        return [b - a for a, b in zip(inside, inside[1:], strict=False)]

    def largest_gap(self, start: float, end: float) -> float:
        """The longest silence between two chunks (or the window's edges) inside [start, end]."""
        return self.largest_gap_at(start, end)[0]

    def largest_gap_at(self, start: float, end: float) -> tuple[float, float]:
        """That silence, and when it began, in seconds after `start`. A stream still silent
        at `end` counts to `end`."""
        inside = [start] + [t for t in self.times if start <= t <= end]
        after = [t for t in self.times if t > end]
        edges = inside + [after[0] if after else end]
        gaps = [(b - a, a - start) for a, b in zip(edges, edges[1:], strict=False)]
        return max(gaps, default=(0.0, 0.0))


def healthy_body(max_tokens: int) -> dict:
    """A stream that runs to max_tokens: greedy, the model goes on counting."""
    return {
        "model": MODEL,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }


async def run_stream(http: httpx.AsyncClient, url: str, stream: Stream, max_tokens: int) -> None:
    headers = {"cache-control": "no-cache"}  # generated, never a cached answer
    body = healthy_body(max_tokens)
    async with http.stream("POST", url + COMPLETIONS, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                stream.times.append(time.monotonic())


def big_prompt_bodies(count: int, size: int = 1_000_000) -> list[bytes]:
    text = "lorem ipsum dolor sit amet " * (size // 27)
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return [json.dumps(body).encode()] * count


def many_message_bodies(count: int, messages: int = 28_000) -> list[bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}] * messages}
    return [json.dumps(body).encode()] * count


async def post_all(url: str, bodies: list[bytes]) -> list[int]:
    """Send every body at once; their statuses (each must be refused, quickly)."""
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=120) as http:
        responses = await asyncio.gather(
            *(http.post(url + CHAT, content=b, headers=headers) for b in bodies)
        )
    return [r.status_code for r in responses]


async def half_open(url: str, count: int, hold_s: float) -> list[int]:
    """`count` connections that declare a body, send half of it, and hold still."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(healthy_body(4)).encode()
    head = (
        f"POST {COMPLETIONS} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sockets = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(head + body[: len(body) // 2])
        sockets.append(s)
    await asyncio.sleep(hold_s)
    for s in sockets:
        s.close()
    return [0] * count


async def measure(
    url: str, abuse: str, streams: int = STREAMS, max_tokens: int = 400, quiet_s: float = 1.0
) -> dict:
    """Largest gaps of `streams` healthy streams, in a quiet window of `quiet_s` and under
    `abuse`, and the median gap of the quiet window (`token_s`: how fast this machine, as busy
    as it is now, makes a token)."""
    results = [Stream() for _ in range(streams)]
    async with httpx.AsyncClient(timeout=300) as http:
        tasks = [asyncio.create_task(run_stream(http, url, s, max_tokens)) for s in results]
        while not all(len(s.times) > 2 for s in results):  # every stream is generating
            await asyncio.sleep(0.05)
        quiet_start = time.monotonic()
        await asyncio.sleep(quiet_s)
        start = time.monotonic()
        statuses = await attack(url, abuse)
        end = time.monotonic()
        await asyncio.sleep(0.3)  # a stall that began at the end of the abuse shows too
        if any(task.done() for task in tasks):  # ended, not stalled: a silence would be no gap
            raise RuntimeError("a healthy stream ended or failed during the abuse")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        timeline = await fetch_timeline(http, url)
    quiet_gap = max(s.largest_gap_at(quiet_start, start) for s in results)
    abuse_gap = max(s.largest_gap_at(start, end + 0.3) for s in results)
    return {
        "abuse": abuse,
        "abuse_s": round(end - start, 3),
        "statuses": sorted(set(statuses)),
        "token_s": round(
            statistics.median(g for s in results for g in s.gaps(quiet_start, start)), 4
        ),
        "largest_gap_quiet_s": round(quiet_gap[0], 3),
        "largest_gap_s": round(abuse_gap[0], 3),
        "largest_gap_at_s": round(abuse_gap[1], 3),
        "quiet_gap_engine": inside_gap(timeline, quiet_start + quiet_gap[1], quiet_gap[0]),
        "gap_engine": inside_gap(timeline, start + abuse_gap[1], abuse_gap[0]),
    }


LONGEST = ("cpu_ms", "sequences", "tokens", "prefill", "decode")  # what the longest one shows


async def fetch_timeline(http: httpx.AsyncClient, url: str) -> dict | None:
    """The server's engine timeline (GET /debug/timeline), or None where it has none."""
    try:
        response = await http.get(url + "/debug/timeline")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def inside_gap(trace: dict | None, began: float, gap_s: float) -> dict | None:
    """What the engine did during a gap that began at `began` (time.monotonic()) and lasted
    `gap_s`: how much of it its iterations covered, and the longest of them. A gap the
    iterations cover is the engine's own work (a forward pass that took that long, or waited for
    a core: its `cpu_ms`, the server process's CPU time meanwhile, says which); a gap they leave
    uncovered is time outside the engine (the event loop held up, or nothing scheduled)."""
    if not trace or "origin_s" not in trace.get("otherData", {}):
        return None
    origin, end = trace["otherData"]["origin_s"], began + gap_s
    covered, longest = 0.0, None
    for event in trace["traceEvents"]:
        if event.get("ph") != "X" or not event["name"].startswith("iteration "):
            continue
        it_start = origin + event["ts"] / 1e6
        it_end = it_start + event["dur"] / 1e6
        overlap = min(it_end, end) - max(it_start, began)
        if overlap <= 0:
            continue
        covered += overlap
        if longest is None or event["dur"] > longest["dur"]:
            longest = event
    row: dict = {
        "in_iterations_ms": round(covered * 1000, 1),
        "outside_ms": round((gap_s - covered) * 1000, 1),
    }
    if longest is not None:
        args = longest["args"]
        row["longest_iteration"] = {
            "ms": round(longest["dur"] / 1000, 1),
            **{k: args[k] for k in LONGEST if k in args},
        }
    return row


async def attack(url: str, abuse: str) -> list[int]:
    """The abuse, from a process of its own: sent from this one, its work (encoding 12 MB,
    opening 400 sockets) would delay the reading of the healthy streams it is measuring."""
    argv = [sys.executable, "-m", "bench.stall", "--url", url, "--attack", abuse]
    child = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the {abuse} attack failed ({child.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


async def send_attack(url: str, abuse: str) -> list[int]:
    if abuse == "big-prompts":
        return await post_all(url, big_prompt_bodies(12))
    if abuse == "many-messages":
        return await post_all(url, many_message_bodies(6))
    if abuse == "half-open":
        return await half_open(url, 400, hold_s=3.0)
    raise ValueError(f"unknown abuse {abuse!r}; one of {ABUSES}")


def entries(rows: list[dict], step: str) -> Entries:
    """One entry for each abuse, `STEP:ABUSE`, at the streams' level: the row is the summary
    but for the statuses (a list, which no figure reads), kept beside it."""
    found: Entries = {}
    for row in rows:
        summary = {k: v for k, v in row.items() if k not in ("abuse", "statuses")}
        found[f"{step}:{row['abuse']}"] = {
            STREAMS: {"summary": summary, "statuses": row["statuses"]}
        }
    return found


def report(rows: list[dict]) -> str:
    """The rows as a table: the largest gaps, and how much of the abuse's the engine covered."""
    lines = [
        "| abuse | largest gap ms | in iterations ms | outside ms | longest iteration ms "
        "(CPU ms) | quiet: largest gap ms | token ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        engine = row.get("gap_engine") or {}
        longest = engine.get("longest_iteration") or {}
        iteration = f"{longest.get('ms', '-')} ({longest.get('cpu_ms', '-')})"
        cells = [row["abuse"], _ms(row["largest_gap_s"]), engine.get("in_iterations_ms", "-"),
                 engine.get("outside_ms", "-"), iteration, _ms(row["largest_gap_quiet_s"]),
                 _ms(row["token_s"])]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.strip())
    parser.add_argument("--step", default="7", help="the step to start (number or folder)")
    parser.add_argument("--url", default="", help="measure a running server instead")
    parser.add_argument("--abuse", default=",".join(ABUSES), help=f"comma-separated: {ABUSES}")
    parser.add_argument("--goal-ms", type=float, default=250.0, help="the largest gap allowed")
    parser.add_argument("--publish", default="", metavar="NAME", help="bench/charts/NAME")
    parser.add_argument("--attack", default="", help=argparse.SUPPRESS)  # the abuse process
    args = parser.parse_args(argv)
    if args.publish and not valid_name(args.publish):
        parser.error("--publish takes a folder name under bench/charts, like stall-7")
    if args.attack:
        print(json.dumps(asyncio.run(send_attack(args.url.rstrip("/"), args.attack))))
        return 0
    # a server started elsewhere is named "server" in what is published
    step = select_steps(discover_steps(), args.step)[0] if not args.url else "server"
    rows: list[dict] = []
    with target(args.url, step, "stall") as (url, _):
        for abuse in args.abuse.split(","):
            print(f"[stall] {abuse} ...", flush=True)
            row = asyncio.run(measure(url, abuse))
            verdict = "ok" if row["largest_gap_s"] * 1000 < args.goal_ms else "OVER THE GOAL"
            print(f"[stall] {json.dumps(row)} {verdict}", flush=True)
            rows.append(row)
    config = {"step": step, "abuse": args.abuse, "goal_ms": args.goal_ms, "streams": STREAMS}
    finish("stall", argv, report(rows), args.publish, entries(rows, step), config)
    return 1 if any(row["largest_gap_s"] * 1000 >= args.goal_ms for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
