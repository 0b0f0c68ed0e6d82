"""Drive Locust as a library for one concurrency level, in its own process.

Locust monkey-patches the standard library with gevent on import; running it in a child process
keeps that away from the harness (and from pytest). The harness enforces a hard timeout on top.

    python -m bench.loadgen --host URL --users 8 --run-time 20 --stop-timeout 20 \
        --max-tokens 32 --max-requests 200 --records out.jsonl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gevent
from locust.env import Environment

from bench.locustfile import ChatUser, LoadSettings, configure
from bench.workload import DEFAULT_WORKLOAD


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--run-time", type=float, required=True, help="seconds of new requests")
    parser.add_argument("--stop-timeout", type=float, default=10.0, help="s to let streams end")
    parser.add_argument("--model", default=LoadSettings.model)
    parser.add_argument("--max-tokens", type=int, default=LoadSettings.max_tokens)
    parser.add_argument("--max-requests", type=int, default=0)
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--salt", default="0", help="makes generated prompts this level's own")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    settings = LoadSettings(
        args.workload, args.model, args.max_tokens, args.max_requests, args.records, salt=args.salt
    )
    state = configure(settings)
    env = Environment(user_classes=[ChatUser], host=args.host, stop_timeout=args.stop_timeout)
    runner = env.create_local_runner()
    runner.start(args.users, spawn_rate=args.users)
    deadline = time.monotonic() + args.run_time
    while time.monotonic() < deadline and not state.budget_spent():
        gevent.sleep(0.2)
    # Users finish the request they are in (up to stop_timeout), then are killed.
    runner.quit()


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
