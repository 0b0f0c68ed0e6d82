"""What a grammar costs per token: the same prompts with and without a JSON schema.

    python -m bench.structured --step 7 --users 1,16 --seconds 40

One server (a step, started here, or --url), closed-loop streaming users sending the bench's
chat prompts, greedy, 64 output tokens. Each level runs twice: plain, then with a
`response_format` JSON schema whose one string field lets the answer run as long as a plain
one (`{"answer": string}`), so that both runs produce about the same tokens. Reported per run:
output tokens/s, time per output token (p50, ms), and the overhead of the schema run on each;
written to RESULTS/structured.json (with the commit and the machine, its class included) and
drawn to RESULTS/structured.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.provenance import git_facts, machine_facts
from bench.servers import StepServer, discover_steps, select_steps
from bench.workload import load_workload

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}


async def user(http, url: str, bodies: list[dict], until: float, out: list) -> None:
    """One closed-loop user: request after request until `until`; (tokens, seconds, TPOT)."""
    i = 0
    while time.monotonic() < until:
        body = bodies[i % len(bodies)]
        i += 1
        start, times, tokens = time.monotonic(), [], 0
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"delta"' in line:
                    times.append(time.monotonic())
                if line.startswith("data: {") and '"usage"' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        tpot = (times[-1] - times[1]) / (len(times) - 2) if len(times) > 2 else None
        out.append((tokens, time.monotonic() - start, tpot))


async def level(url: str, users: int, seconds: float, structured: bool) -> dict:
    workload = load_workload()
    bodies = []
    for prompt in workload.prompts:
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": workload.messages(prompt),
            "max_tokens": 64,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        bodies.append({**body, "response_format": FORMAT} if structured else body)
    out: list = []
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600, headers={"cache-control": "no-cache"}) as http:
        await asyncio.gather(
            *(
                user(http, url, bodies[u:] + bodies[:u], started + seconds, out)
                for u in range(users)
            )
        )
    elapsed = time.monotonic() - started
    tpots = [t for _, _, t in out if t is not None]
    return {
        "users": users,
        "structured": structured,
        "requests": len(out),
        "output_tokens": sum(t for t, _, _ in out),
        "tokens_per_s": round(sum(t for t, _, _ in out) / elapsed, 1),
        "tpot_p50_ms": round(1000 * statistics.median(tpots), 1) if tpots else None,
    }


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["users"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.35
    for k, structured in enumerate((False, True)):
        values = [next(r["tokens_per_s"] for r in rows if r["users"] == u and
                       r["structured"] == structured) for u in levels]  # fmt: skip
        label = "JSON schema" if structured else "plain"
        ax.bar([i + (k - 0.5) * width for i in range(len(levels))], values, width, label=label)
    ax.set_xticks(range(len(levels)), [f"{u} users" for u in levels])
    ax.set_ylabel("output tokens/s")
    ax.set_title("Step 7: the same prompts, with and without a JSON schema")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__)
    parser.add_argument("--step", default="7")
    parser.add_argument("--url", default="")
    parser.add_argument("--users", default="1,16")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--results", default="bench/results/structured")
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    server, url = None, args.url.rstrip("/")
    if not url:
        (step,) = select_steps(discover_steps(), args.step)
        print(f"[structured] starting {step}", flush=True)
        server = StepServer(step, "float32", Path(tempfile.mkdtemp()) / f"{step}.log")
        server.wait_ready(300)
        url = server.url
    rows = []
    try:
        for users in (int(u) for u in args.users.split(",")):
            for structured in (False, True):
                print(f"[structured] {users} users, schema={structured} ...", flush=True)
                rows.append(asyncio.run(level(url, users, args.seconds, structured)))
                print(f"[structured] {json.dumps(rows[-1])}", flush=True)
    finally:
        if server is not None:
            server.stop()
    for plain, schema in zip(rows[::2], rows[1::2], strict=True):
        cost = 1 - schema["tokens_per_s"] / plain["tokens_per_s"]
        tpots = f"TPOT p50 {plain['tpot_p50_ms']} -> {schema['tpot_p50_ms']} ms"
        print(f"[structured] {plain['users']} users: the schema costs {100 * cost:.1f}% ({tpots})")
    meta = {**git_facts(), "machine": machine_facts()}  # compare only runs of one class
    (results / "structured.json").write_text(json.dumps({"meta": meta, "levels": rows}, indent=2))
    draw(rows, results / "structured.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
