"""The Locust user: a closed-loop client streaming the workload's chat prompts, one record each.

The harness runs it through `python -m bench.loadgen`. It also works with the plain Locust CLI,
configured by BENCH_* env vars, to watch a server in Locust's web UI:

    BENCH_MAX_TOKENS=64 locust -f bench/locustfile.py --host http://127.0.0.1:8000
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import gevent
from gevent import GreenletExit
from locust import HttpUser, constant, task
from locust.exception import StopUser

from bench.records import Record, StreamParser, backoff_delay, retry_after_seconds
from bench.workload import DEFAULT_WORKLOAD, RequestClass, Workload, chat_body, load_workload


@dataclass(frozen=True)
class LoadSettings:
    workload_path: Path = DEFAULT_WORKLOAD
    model: str = "SmolLM2-135M-Instruct"
    max_tokens: int = 32
    max_requests: int = 0  # logical requests across all users; 0 means no bound
    records_path: Path | None = None  # JSONL, one line per attempt
    max_attempts: int = 4  # first try plus up to three retries after 429/503
    read_timeout_s: float = 300.0  # longest silence tolerated inside a stream
    salt: str = "0"  # makes a generated workload's prompts this level's own (bench/generate.py)

    @classmethod
    def from_env(cls) -> LoadSettings:
        env = os.environ.get
        records = env("BENCH_RECORDS")
        return cls(
            workload_path=Path(env("BENCH_WORKLOAD", str(DEFAULT_WORKLOAD))),
            model=env("BENCH_MODEL", cls.model),
            max_tokens=int(env("BENCH_MAX_TOKENS", cls.max_tokens)),
            max_requests=int(env("BENCH_MAX_REQUESTS", cls.max_requests)),
            records_path=Path(records) if records else None,
            salt=env("BENCH_SALT", cls.salt),
        )


class _Shared:
    """State shared by all users of this process (gevent: one thread, no locks needed)."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self.workload: Workload = load_workload(settings.workload_path)
        self.ids = itertools.count()
        self.users = itertools.count()  # each user's number, which picks its request class
        self.finished = 0
        self.out: IO[str] | None = None
        if settings.records_path is not None:
            self.out = open(
                settings.records_path, "a", buffering=1
            )  # line-buffered: survives a kill

    def write(self, record: Record) -> None:
        if self.out is not None:
            self.out.write(record.to_json() + "\n")

    def budget_spent(self) -> bool:
        bound = self.settings.max_requests
        return bool(bound) and self.finished >= bound


_shared: _Shared | None = None


def configure(settings: LoadSettings) -> _Shared:
    global _shared
    _shared = _Shared(settings)
    return _shared


def shared() -> _Shared:
    return _shared or configure(LoadSettings.from_env())


class ChatUser(HttpUser):
    wait_time = constant(0)  # closed loop: the next request leaves when the previous one ends
    request_class: RequestClass | None = None

    def on_start(self) -> None:
        self.request_class = shared().workload.class_of_user(next(shared().users))

    @task
    def chat(self) -> None:
        state = shared()
        request_id = next(state.ids)
        if state.settings.max_requests and request_id >= state.settings.max_requests:
            raise StopUser()
        settings, pinned = state.settings, self.request_class
        prompt = state.workload.prompt_for(pinned, request_id, settings.salt)
        max_tokens = (pinned.max_tokens if pinned else None) or settings.max_tokens
        body = chat_body(state.workload, prompt, settings.model, max_tokens, stream=True)
        self._send_with_retries(state, request_id, prompt.id, body)
        state.finished += 1

    def _send_with_retries(self, state: _Shared, request_id: int, prompt_id: str, body) -> None:
        kind = self.request_class.name if self.request_class else ""
        for attempt in range(state.settings.max_attempts):
            record = Record(request_id, attempt, prompt_id, time.time(), 0, request_class=kind)
            record = self._attempt(record, body)
            state.write(record)
            if not record.rejected or record.retry_after_s is None:
                return
            gevent.sleep(backoff_delay(attempt, record.retry_after_s))

    def _attempt(self, record: Record, body: dict) -> Record:
        sent = time.monotonic()
        parser = StreamParser(record, sent)
        timeout = (10.0, shared().settings.read_timeout_s)  # (connect, between bytes) in s
        try:
            with self.client.post(
                "/v1/chat/completions",
                json=body,
                # Measure the engine, not step 4's hot-response cache: the workload repeats its
                # prompts at temperature 0, which that cache would answer without the model.
                headers={"Cache-Control": "no-cache"},
                stream=True,
                catch_response=True,
                timeout=timeout,
                name="chat",
            ) as response:
                _read_response(record, response, parser)
                _report(response, record)
        except GreenletExit:  # the level ended mid-request: keep what arrived, marked as such
            parser.close()
            record.cut_off, record.error = True, "cut off when the level ended"
            record.e2e_s = time.monotonic() - sent
            shared().write(record)
            raise
        except Exception as exc:  # the server died or hung up mid-stream: a failed attempt
            record.error = record.error or f"{type(exc).__name__}: {exc}"
        record.e2e_s = time.monotonic() - sent
        return record


def _read_response(record: Record, response, parser: StreamParser) -> None:
    record.status = response.status_code or 0
    if record.status == 200:
        for line in response.iter_lines(decode_unicode=True):
            if parser.feed(time.monotonic(), line):
                break
        parser.close()
    elif record.status == 0:  # Locust turns connection errors into status 0
        record.error = f"no response: {response.error}"
    else:
        record.retry_after_s = retry_after_seconds(response.headers.get("Retry-After"))
        record.error = f"HTTP {record.status}"


def _report(response, record: Record) -> None:
    """Keep Locust's own statistics truthful too, for runs watched in its UI."""
    if record.ok:
        response.success()
    else:
        response.failure(record.error)
