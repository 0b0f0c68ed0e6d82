"""The engine's timeline: what every iteration did, to every request, kept in a ring buffer.

An engine that batches (step 3's static batcher, step 7's continuous one) records one
`Iteration` per forward pass: when it started and how long its phases took (scheduling, the
forward pass, sampling, handing the tokens over), what each sequence in it did (a prefill chunk
of N tokens from position P, a decode, a padding row that had already finished), who was
preempted or finished, the token budget used, KV blocks in use, and how many requests waited.
The last `timeline_iterations` are kept (a deque: the oldest falls off).

`GET /debug/timeline?last=N` returns them as Chrome Trace Event JSON, which Perfetto
(ui.perfetto.dev) and chrome://tracing open: an engine track with one slice per iteration (its
phases nested inside), one track per request (queued, its prefill chunks and decodes, preempted,
finished), and counter tracks for running, waiting and KV blocks. `bench/timeline_chart.py`
draws the same data as a picture: iterations across, requests down.

Recording costs a few small objects per iteration: about 50-60 us at 16 sequences, measured
in step 7's engine on the tiny model (0.1% of a real-model iteration at 16 users, about 65 ms);
`--timeline false` turns it off.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from common.config import ConfigPart, knob

PHASES = ("schedule", "forward", "sample", "hand-over")


@dataclass(frozen=True)
class TimelineConfig(ConfigPart):
    timeline: bool = knob(True, "record every iteration for GET /debug/timeline")
    timeline_iterations: int = knob(4096, "iterations the timeline keeps (the oldest go first)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timeline_iterations < 1:
            raise ValueError("timeline_iterations must be at least 1")


@dataclass(frozen=True)
class Step:
    """What one sequence did in one iteration."""

    request_id: str
    kind: str  # "prefill" | "decode" | "padding" (a finished row in a static batch) | "verify"
    tokens: int  # new tokens run through the model for it
    position: int  # the position of the first of them
    cached: int = 0  # prompt tokens a prefix cache supplied, when it was let in this iteration
    proposed: int = 0  # speculation: draft tokens checked in this iteration
    accepted: int = 0  # ... and kept


@dataclass
class Iteration:
    number: int
    start: float  # time.monotonic()
    phases: dict[str, float]  # seconds each, in PHASES order
    steps: list[Step]
    preempted: list[str] = field(default_factory=list)  # request ids
    finished: list[tuple[str, str]] = field(default_factory=list)  # (request id, how)
    budget: int = 0  # tokens the iteration could have run
    kv_used: int = 0  # blocks, after the iteration
    kv_total: int = 0
    waiting: int = 0
    running: int = 0
    cpu_s: float = 0.0  # CPU time of the whole process meanwhile, every thread (0: not taken)

    @property
    def duration(self) -> float:
        return sum(self.phases.values())

    @property
    def num_tokens(self) -> int:
        return sum(step.tokens for step in self.steps if step.kind != "padding")


@dataclass
class Span:
    """A request's life, as far as the engine saw it."""

    arrival: float
    end: float | None = None
    how: str | None = None  # the finish reason, "cancelled" or "failed"


class Timeline:
    """The ring buffer. Written by the engine (on its worker thread, for step 3), read by the
    route on the event loop: a lock keeps each side whole."""

    def __init__(self, size: int) -> None:
        self.iterations: deque[Iteration] = deque(maxlen=size)
        self.spans: OrderedDict[str, Span] = OrderedDict()  # the requests they mention
        self.max_spans = 4 * size
        self._count = 0
        self._lock = threading.Lock()

    def next_number(self) -> int:
        self._count += 1
        return self._count

    def record(self, iteration: Iteration) -> None:
        with self._lock:
            self.iterations.append(iteration)

    def arrived(self, request_id: str, arrival: float) -> None:
        with self._lock:
            self.spans.setdefault(request_id, Span(arrival))
            while len(self.spans) > self.max_spans:
                self.spans.popitem(last=False)

    def ended(self, request_id: str, how: str) -> None:
        with self._lock:
            span = self.spans.get(request_id)
            if span is not None and span.end is None:
                span.end, span.how = time.monotonic(), how

    def snapshot(
        self, last: int | None = None, after: int = 0
    ) -> tuple[list[Iteration], dict[str, Span]]:
        """The last `last` iterations (all kept: None) numbered after `after`, and the spans of
        the requests they mention."""
        with self._lock:
            iterations = [it for it in self.iterations if it.number > after]
            iterations = iterations[-last:] if last else iterations
            ids = {s.request_id for it in iterations for s in it.steps}
            ids |= {r for it in iterations for r in it.preempted}
            spans = {rid: Span(s.arrival, s.end, s.how) for rid, s in self.spans.items()}
        return iterations, {rid: span for rid, span in spans.items() if rid in ids}


class PhaseClock:
    """Times an iteration's phases as they happen: `clock.lap("forward")` after each."""

    def __init__(self) -> None:
        self.start = self._last = time.monotonic()
        self.cpu_start = time.process_time()  # what the iteration cost, beside how long it took
        self.phases: dict[str, float] = {}

    def cpu(self) -> float:
        """The process's CPU seconds since the clock started, all its threads together: far
        below the wall time (times the threads) means the iteration waited for a core."""
        return time.process_time() - self.cpu_start

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now


# ---------------------------------------------------------------- Chrome Trace Event JSON

ENGINE, REQUESTS = 1, 2  # the two "processes" of the trace: the engine, and the requests


def trace(iterations: list[Iteration], spans: dict[str, Span]) -> dict[str, Any]:
    """The Trace Event Format's JSON object form: `traceEvents`, timestamps in microseconds
    from the first event shown. `otherData.origin_s` is that first event's time.monotonic(),
    so that a client on the same machine can put its own times on the trace's axis."""
    origin = min([it.start for it in iterations] + [s.arrival for s in spans.values()], default=0)

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 1)

    events: list[dict] = [
        _meta("process_name", ENGINE, 0, "engine"),
        _meta("thread_name", ENGINE, 0, "iterations"),
        _meta("process_name", REQUESTS, 0, "requests"),
    ]
    for it in iterations:
        events += _iteration_events(it, us)
    tracks = {rid: i + 1 for i, rid in enumerate(sorted(spans, key=lambda r: spans[r].arrival))}
    for rid, tid in tracks.items():
        events.append(_meta("thread_name", REQUESTS, tid, rid))
        events += _request_events(rid, tid, spans[rid], iterations, us)
    other = {"clock": "time.monotonic", "origin_s": origin}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def _meta(name: str, pid: int, tid: int, label: str) -> dict:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "ts": 0, "args": {"name": label}}


def _iteration_events(it: Iteration, us) -> list[dict]:
    kinds = [s.kind for s in it.steps]
    args = {
        "iteration": it.number,
        "sequences": len(it.steps),
        "tokens": it.num_tokens,
        "budget": it.budget,
        "prefill": kinds.count("prefill"),
        "decode": kinds.count("decode"),
        "padding": kinds.count("padding"),
        "preempted": it.preempted,
        "finished": [rid for rid, _ in it.finished],
        "kv_blocks_used": it.kv_used,
        "cpu_ms": round(it.cpu_s * 1000, 1),
    }
    start = it.start
    events = [_slice(f"iteration {it.number}", ENGINE, 0, us(start), it.duration, args)]
    for phase in PHASES:
        if phase in it.phases:
            events.append(_slice(phase, ENGINE, 0, us(start), it.phases[phase], {}))
            start += it.phases[phase]
    ts = us(it.start)
    events += [
        {"name": "running", "ph": "C", "pid": ENGINE, "tid": 0, "ts": ts,
         "args": {"running": it.running}},
        {"name": "waiting", "ph": "C", "pid": ENGINE, "tid": 0, "ts": ts,
         "args": {"waiting": it.waiting}},
        {"name": "kv blocks", "ph": "C", "pid": ENGINE, "tid": 0, "ts": ts,
         "args": {"used": it.kv_used, "free": it.kv_total - it.kv_used}},
    ]  # fmt: skip
    return events


def _request_events(rid: str, tid: int, span: Span, iterations: list[Iteration], us):
    """queued (arrival to its first iteration), one slice per iteration it was in, preempted
    (as an instant), finished (an instant at its end)."""
    events: list[dict] = []
    first = next((it for it in iterations if any(s.request_id == rid for s in it.steps)), None)
    if first is not None and first.start > span.arrival:
        events.append(
            _slice("queued", REQUESTS, tid, us(span.arrival), first.start - span.arrival, {})
        )
    for it in iterations:
        for step in it.steps:
            if step.request_id == rid:
                name = step.kind if step.kind != "prefill" else f"prefill {step.tokens}"
                args = {"iteration": it.number, "kind": step.kind, "tokens": step.tokens,
                        "position": step.position, "cached": step.cached,
                        "proposed": step.proposed, "accepted": step.accepted}  # fmt: skip
                events.append(_slice(name, REQUESTS, tid, us(it.start), it.duration, args))
        if rid in it.preempted:
            events.append(_instant("preempted", tid, us(it.start), {"iteration": it.number}))
    if span.end is not None:
        events.append(_instant(span.how or "finished", tid, us(span.end), {}))
    return events


def _slice(name: str, pid: int, tid: int, ts: float, dur_s: float, args: dict) -> dict:
    dur = round(dur_s * 1e6, 1)
    return {"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _instant(name: str, tid: int, ts: float, args: dict) -> dict:
    return {"name": name, "ph": "i", "s": "t", "pid": REQUESTS, "tid": tid, "ts": ts, "args": args}
