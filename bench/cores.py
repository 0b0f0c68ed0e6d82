"""How busy each core is during an iteration: the threads' time on CPU, sampled every millisecond.

`python -m bench.step7_profile --cores --users 16,64` runs step 7's decode iterations in-process
and starts this module as a separate sampler process (a thread would take the GIL from the engine
between ops, the very time it is measuring). Every period it reads, for each thread of the
engine's process, /proc/PID/task/TID/schedstat, whose first field is the thread's time on CPU in
ns (stat's utime and stime count 10 ms ticks: too coarse for ~1 ms ops), and field 39 of
/proc/PID/task/TID/stat, the CPU it last ran on. Between two samples a thread was on CPU for the
difference of the first, counted on the CPU the second names (a thread that moved in between is
counted on its new CPU: at 1 ms the error is small).

From the samples: each thread's and each core's busy fraction per iteration, and the iteration's
wall time split into the time when 2, 1 or 0 cores were busy (a core is busy in a sample interval
when its threads were on CPU for at least half of it). 1 core busy is the serial part: Python
between ops, the loop thread's hand-over, ops too small to be split. 0 is waiting: the thread hop,
or another process holding the cores.

A thread that waits spinning is on CPU: torch's OpenMP (libgomp) lets its pool's threads spin
for a while after a parallel region before they sleep, so a worker waiting for the next region
counts as busy. `OMP_WAIT_POLICY=passive` in the environment makes them sleep at once, which
shows the work alone (and changes its timing); the record keeps the variables it ran with.

    python -m bench.cores --sample PID TID...   (what the profiler starts; reads until stdin ends)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

BUSY = 0.5  # a core is busy in an interval when its threads ran at least this share of it


def cpu_ns(schedstat: str) -> tuple[int, int]:
    """A thread's time on CPU and its time ready but waiting for one (on a run queue), in ns:
    the first two fields of /proc/PID/task/TID/schedstat."""
    on_cpu, waiting = schedstat.split()[:2]
    return int(on_cpu), int(waiting)


def last_cpu(stat: str) -> int:
    """The CPU a thread last ran on: field 39 of /proc/PID/task/TID/stat. The fields are counted
    after the command name, which is in parentheses and may itself hold spaces."""
    after_name = stat[stat.rindex(")") + 2 :].split()
    return int(after_name[39 - 3])  # after_name[0] is field 3 (the state)


@dataclass(frozen=True)
class Interval:
    """One thread between two samples: [start, end] in seconds (CLOCK_MONOTONIC), `busy` its
    share of the interval on CPU (0..1), on `cpu`; `ready` its share ready to run but waiting for
    a core (another thread or process had it)."""

    tid: int
    start: float
    end: float
    busy: float
    cpu: int
    ready: float = 0.0


def intervals(samples: list[dict]) -> list[Interval]:
    """Per-thread busy intervals from samples {"t": s, "threads": {tid: [ns on CPU, cpu, ns
    ready]}}."""
    out = []
    for before, after in zip(samples, samples[1:], strict=False):
        dt = after["t"] - before["t"]
        if dt <= 0:
            continue
        for tid, (ns, cpu, ready_ns) in after["threads"].items():
            if tid in before["threads"]:
                ran = (ns - before["threads"][tid][0]) / 1e9 / dt
                ready = (ready_ns - before["threads"][tid][2]) / 1e9 / dt
                out.append(Interval(int(tid), before["t"], after["t"], min(ran, 1.0), cpu,
                                    min(ready, 1.0)))  # fmt: skip
    return out


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


Spans = dict[tuple[float, float], list[Interval]]


def by_span(found: list[Interval]) -> Spans:
    """The intervals grouped by sample interval, in time order."""
    spans: Spans = {}
    for i in sorted(found, key=lambda i: i.start):
        spans.setdefault((i.start, i.end), []).append(i)
    return spans


def split(spans: Spans, start: float, end: float, cpus: list[int]) -> dict:
    """An iteration [start, end] on `cpus` (the process's affinity): the share of its wall time
    with 0, 1, 2... cores busy ("cores_busy", by count), each core's busy share ("core_busy", by
    CPU number) and each thread's ("thread_busy", by tid), and the threads' summed share ready
    but kept off a core ("ready_waiting": near 0 on a quiet machine)."""
    wall = end - start
    by_count = dict.fromkeys(range(len(cpus) + 1), 0.0)
    per_core = dict.fromkeys(cpus, 0.0)
    per_thread: dict[int, float] = {}
    ready = 0.0
    for (s0, s1), here in spans.items():
        share = overlap(s0, s1, start, end) / wall
        if not share:
            continue
        load = dict.fromkeys(cpus, 0.0)
        for i in here:
            if i.cpu in load:  # a CPU outside the affinity: a thread of another affinity
                load[i.cpu] += i.busy
            per_thread[i.tid] = per_thread.get(i.tid, 0.0) + i.busy * share
            ready += i.ready * share
        by_count[sum(1 for v in load.values() if v >= BUSY)] += share
        for cpu, v in load.items():
            per_core[cpu] += min(v, 1.0) * share
    return {
        "cores_busy": by_count,
        "core_busy": per_core,
        "thread_busy": per_thread,
        "ready_waiting": {"threads": ready},
    }


def threads_of(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def trace_iterations(trace: dict) -> list[tuple[float, float]]:
    """[start, end] in time.monotonic() seconds of each iteration in a GET /debug/timeline
    trace (its timestamps are microseconds from `otherData.origin_s`, on the same clock)."""
    origin = trace["otherData"]["origin_s"]
    return sorted(
        (origin + e["ts"] / 1e6, origin + (e["ts"] + e["dur"]) / 1e6)
        for e in trace["traceEvents"]
        if e["ph"] == "X" and e["pid"] == 1 and e["name"].startswith("iteration ")
    )


def sample(
    pid: int, tids: list[int], period: float, stop: IO = sys.stdin
) -> tuple[list[dict], float]:
    """Read every thread's schedstat and stat each `period` seconds until `stop` is readable
    (or ends), and the seconds on CPU that took (the sampler's cost to the work it watches).
    The files stay open: a pread at 0 makes the kernel write them afresh."""
    files = {}
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            files[tid] = (os.open(f"{base}/schedstat", os.O_RDONLY), os.open(f"{base}/stat", 0))
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    samples, stopped, cpu = [], False, time.process_time()
    while not stopped:
        samples.append(read_all(files))
        if not samples[1:]:
            print("ready", flush=True)  # the watched work may start: the first sample is in
        stopped = bool(select.select([stop], [], [], period)[0])
    samples.append(read_all(files))  # the work ended before the stop: cover its last part
    return samples, time.process_time() - cpu


def read_all(files: dict[int, tuple[int, int]]) -> dict:
    """One sample: the time, and each thread's [ns on CPU, last CPU, ns ready]."""
    row = {}
    t = time.monotonic()
    for tid, (sched, stat) in files.items():
        try:
            on_cpu, ready = cpu_ns(os.pread(sched, 256, 0).decode())
            row[tid] = [on_cpu, last_cpu(os.pread(stat, 4096, 0).decode()), ready]
        except (OSError, ValueError):  # the thread ended
            continue
    return {"t": t, "threads": row}


def level_record(
    samples: list[dict], bounds: list[tuple[float, float]], named: dict[int, str],
    cpus: list[int], drawn: int = 3, other: str = "pool",
) -> dict:  # fmt: skip
    """One level's numbers from its samples and its iterations' [start, end]: each iteration's
    split, their mean, the threads that ran (`named` roles; any other that ran >= 1% is `other`),
    and the first `drawn` iterations' intervals in ms from the first one's start, to draw."""
    found = intervals(samples)
    spans = by_span(found)
    each = [split(spans, s, e, cpus) for s, e in bounds]
    summary = {key: mean_of([it[key] for it in each]) for key in each[0]}
    roles = {tid: named.get(tid, other) for tid, share in summary["thread_busy"].items()
             if share >= 0.01 or tid in named}  # fmt: skip
    t0, t1 = bounds[0][0], bounds[min(drawn, len(bounds)) - 1][1]
    window = [[i.tid, 1000 * (i.start - t0), 1000 * (i.end - t0), round(i.busy, 3), i.cpu]
              for i in found if i.tid in roles and overlap(i.start, i.end, t0, t1)]  # fmt: skip
    return {
        "iterations": len(bounds),
        "iteration_ms": 1000 * sum(e - s for s, e in bounds) / len(bounds),
        "cpus": cpus,
        "roles": roles,
        "summary": summary,
        "per_iteration": each,
        "drawn": {
            "intervals": window,
            "boundaries": sorted({round(1000 * (x - t0), 3) for b in bounds[:drawn] for x in b}),
        },
    }


def mean_of(dicts: list[dict]) -> dict:
    """The mean of each key over dicts (a key missing from one counts 0 there)."""
    keys = {k for d in dicts for k in d}
    return {k: sum(d.get(k, 0.0) for d in dicts) / len(dicts) for k in sorted(keys)}


class Sampler:
    """The sampler process around a block of work: start(), then stop() returns its samples."""

    def __init__(self, tids: list[int], period: float = 0.001, pid: int | None = None) -> None:
        self.tids, self.period, self.pid = tids, period, pid or os.getpid()
        self.proc: subprocess.Popen | None = None
        self.cpu_s = 0.0  # the sampler's own time on CPU: its cost to the work it watches

    def start(self) -> None:
        args = [sys.executable, "-m", "bench.cores", "--sample", str(self.pid)]
        args += ["--period", str(self.period), *map(str, self.tids)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":  # its first sample is in
            raise RuntimeError("the sampler did not start: see its error above")

    def stop(self) -> list[dict]:
        assert self.proc is not None
        out, _ = self.proc.communicate(b"stop\n", timeout=60)
        found = json.loads(out)
        samples, self.cpu_s = found["samples"], found["cpu_s"]
        for s in samples:  # JSON keys are strings
            s["threads"] = {int(tid): v for tid, v in s["threads"].items()}
        return samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cores", description=__doc__)
    p.add_argument("--sample", type=int, required=True, help="the process to sample")
    p.add_argument("--period", type=float, default=0.001, help="seconds between samples")
    p.add_argument("tids", type=int, nargs="*", help="its threads (default: all)")
    args = p.parse_args(argv)
    tids = args.tids or threads_of(args.sample)
    samples, cpu_s = sample(args.sample, tids, args.period)
    json.dump({"samples": samples, "cpu_s": cpu_s}, sys.stdout)


if __name__ == "__main__":
    main()
