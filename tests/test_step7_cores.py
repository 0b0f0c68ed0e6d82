"""The cores profile of step 7 (bench/cores.py, bench/cores_chart.py, step7_profile --cores):
/proc parsing, the 2/1/0-cores split from synthetic samples, the picture from a synthetic
record, the sampler process on this process's own threads, and one run on the tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from bench import cores, cores_chart, omp_regions
from bench.cores import Interval


def stat_line(cpu: int, name: str = "python") -> str:
    """A /proc/PID/task/TID/stat line (52 fields) whose field 39 is `cpu`."""
    fields = ["1234", f"({name})", "R"] + [str(n) for n in range(4, 53)]
    fields[38] = str(cpu)  # field 39, counted from 1
    return " ".join(fields) + "\n"


def test_last_cpu_is_field_39_even_with_spaces_and_parens_in_the_name():
    assert cores.last_cpu(stat_line(1)) == 1
    assert cores.last_cpu(stat_line(7, name="pt (main) 2")) == 7


def test_schedstat_gives_ns_on_cpu_and_ns_ready():
    assert cores.cpu_ns("33778245 2508632 21\n") == (33778245, 2508632)


def samples(*rows: tuple[float, dict[int, list[int]]]) -> list[dict]:
    return [{"t": t, "threads": threads} for t, threads in rows]


def test_intervals_are_each_threads_share_between_samples_on_its_later_cpu():
    found = cores.intervals(
        samples(
            (0.000, {1: [0, 0, 0], 2: [0, 0, 0]}),
            (0.010, {1: [10_000_000, 1, 0], 2: [2_500_000, 0, 5_000_000]}),
            (0.020, {1: [10_000_000, 1, 0]}),  # thread 2 ended
        )
    )
    assert found == [
        Interval(1, 0.0, 0.010, 1.0, 1, 0.0),
        Interval(2, 0.0, 0.010, pytest.approx(0.25), 0, pytest.approx(0.5)),
        Interval(1, 0.010, 0.020, 0.0, 1, 0.0),
    ]


def two_threads() -> list[Interval]:
    """10 ms of two threads on two CPUs: both busy 0-5 ms, one 5-8 ms, none 8-10 ms."""
    return [
        Interval(1, 0.000, 0.005, 1.0, 0),
        Interval(2, 0.000, 0.005, 0.9, 1),
        Interval(1, 0.005, 0.008, 1.0, 0),
        Interval(2, 0.005, 0.008, 0.1, 1, ready=0.9),
        Interval(1, 0.008, 0.010, 0.0, 0),
        Interval(2, 0.008, 0.010, 0.0, 1),
    ]


def test_split_counts_the_time_with_two_one_and_no_cores_busy():
    out = cores.split(cores.by_span(two_threads()), 0.0, 0.010, [0, 1])
    assert out["cores_busy"] == {
        2: pytest.approx(0.5),
        1: pytest.approx(0.3),
        0: pytest.approx(0.2),
    }
    assert out["core_busy"] == {0: pytest.approx(0.8), 1: pytest.approx(0.48)}
    assert out["thread_busy"] == {1: pytest.approx(0.8), 2: pytest.approx(0.48)}
    assert out["ready_waiting"]["threads"] == pytest.approx(0.27)


def test_split_counts_only_the_iterations_part_of_an_interval():
    out = cores.split(cores.by_span(two_threads()), 0.004, 0.009, [0, 1])
    # 4-5 ms both busy, 5-8 one, 8-9 none: of 5 ms
    assert out["cores_busy"] == {
        2: pytest.approx(0.2),
        1: pytest.approx(0.6),
        0: pytest.approx(0.2),
    }


def test_two_threads_on_one_cpu_make_one_busy_core():
    found = [Interval(1, 0.0, 0.01, 0.5, 0), Interval(2, 0.0, 0.01, 0.5, 0)]
    out = cores.split(cores.by_span(found), 0.0, 0.01, [0, 1])
    assert out["cores_busy"] == {2: 0.0, 1: 1.0, 0: 0.0}


def synthetic_record() -> dict:
    rows = []
    t = 0.0
    for n in range(40):  # 40 ms: the ops' thread always on CPU 0, the pool's half the time
        ns = [int((n + 1) * 1e6), 0, 0]
        rows.append((t, {10: ns, 11: [int((n + 1) * 0.5e6), 1, 0], 12: [0, 0, 0], 13: [n, 1, 0]}))
        t += 0.001
    level = cores.level_record(
        samples(*rows),
        [(0.0, 0.02), (0.02, 0.039)],
        {10: "calls the ops", 12: "event loop"},
        [0, 1],
    )
    return json.loads(json.dumps({"command": "cmd", "levels": [{"users": 16, **level}]}))


def test_level_record_names_the_threads_that_ran_and_keeps_the_drawn_window():
    level = synthetic_record()["levels"][0]
    # thread 13 ran 1 ns per ms: below 1%, left out; 12 is named, so kept
    assert level["roles"] == {"10": "calls the ops", "11": "pool", "12": "event loop"}
    assert level["summary"]["cores_busy"]["2"] == pytest.approx(1.0, abs=0.06)
    assert level["drawn"]["boundaries"] == [0.0, 20.0, 39.0]
    assert {row[0] for row in level["drawn"]["intervals"]} == {10, 11, 12}


def test_rows_put_the_ops_thread_first_then_the_pool_the_loop_and_the_cores():
    labels = [label for label, _, _ in cores_chart.rows(synthetic_record()["levels"][0])]
    assert labels == ["calls the ops (10)", "pool (11)", "event loop (12)", "CPU 0", "CPU 1"]


def test_picture_draws_a_bar_per_busy_interval_and_the_summary(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level = synthetic_record()["levels"][0]
    fig, ax = plt.subplots()
    cores_chart.draw_level(ax, level)
    busy_threads = sum(1 for row in level["drawn"]["intervals"] if row[3] > 0)
    load = cores_chart.core_load([Interval(*r) for r in level["drawn"]["intervals"]])
    busy_cores = sum(1 for v in load.values() if v > 0)
    assert len(ax.collections) == busy_threads + busy_cores
    assert "2 busy 100%" in ax.get_title()
    plt.close(fig)
    out = tmp_path / "cores.png"
    cores_chart.draw(synthetic_record(), out)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_sampler_sees_a_spinning_thread_busy_and_a_sleeping_one_idle():
    tids: dict[str, int] = {}
    done = threading.Event()

    def spin() -> None:
        tids["spin"] = threading.get_native_id()
        while not done.is_set():
            sum(range(1000))

    def sleep() -> None:
        tids["sleep"] = threading.get_native_id()
        done.wait()

    workers = [threading.Thread(target=spin), threading.Thread(target=sleep)]
    for w in workers:
        w.start()
    while len(tids) < 2:
        time.sleep(0.01)
    sampler = cores.Sampler([tids["spin"], tids["sleep"]])
    sampler.start()
    time.sleep(0.3)
    found = cores.intervals(sampler.stop())
    done.set()
    for w in workers:
        w.join()
    ran = {name: sum(i.busy for i in found if i.tid == tid) for name, tid in tids.items()}
    assert len(found) > 100  # sampled about every ms for 0.3 s or more
    assert ran["sleep"] == 0
    assert ran["spin"] > 10  # on CPU for at least 10 of its sampled intervals' worth


def test_profile_cores_runs_on_the_tiny_model(tiny_model_dir):
    from bench.step7_profile import profile_cores
    from common.config import ServerConfig
    from common.model import load_model
    from step7_real_kv.engine import EngineConfig

    lm = load_model(ServerConfig(model=str(tiny_model_dir)))
    level = asyncio.run(profile_cores(lm, 2, 3, EngineConfig()))
    assert level["iterations"] == 3
    assert "calls the ops" in level["roles"].values()
    assert sum(level["summary"]["cores_busy"].values()) == pytest.approx(1.0, abs=0.05)
    assert 0 <= level["sampler_cpu_share"] < 1


def test_a_servers_iterations_come_from_its_timeline_on_the_monotonic_clock():
    trace = {
        "otherData": {"clock": "time.monotonic", "origin_s": 100.0},
        "traceEvents": [
            {"name": "iteration 2", "ph": "X", "pid": 1, "tid": 0, "ts": 5000.0, "dur": 2000.0},
            {"name": "iteration 1", "ph": "X", "pid": 1, "tid": 0, "ts": 0.0, "dur": 4000.0},
            {"name": "decode", "ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": 4000.0},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "ts": 0, "args": {}},
        ],
    }
    assert cores.trace_iterations(trace) == [
        (100.0, pytest.approx(100.004)),
        (pytest.approx(100.005), pytest.approx(100.007)),
    ]


def test_server_cores_samples_a_running_server_between_its_timeline_iterations(
    start_server, tiny_model_dir
):
    import httpx

    from bench.step7_profile import server_cores

    server = start_server(
        "step7_real_kv", GATEWAY_MODEL=str(tiny_model_dir), GATEWAY_RESPONSE_CACHE="false"
    )
    done = threading.Event()

    def load() -> None:  # one request after another, long enough to span the sampling
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400,
        }
        while not done.is_set():
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        level = server_cores(server.url, server.proc.pid, seconds=1.0)
    finally:
        done.set()
        worker.join()
    assert level["iterations"] > 5
    assert level["users"] == 1
    assert set(level["roles"].values()) == {"server thread"}
    assert sum(level["summary"]["cores_busy"].values()) == pytest.approx(1.0, abs=0.05)


# ---------------------------------------------------------------- OpenMP's parallel regions

REGIONS_PROBE = """
import torch
from bench import omp_regions
counter = omp_regions.Counter(omp_regions.preloaded())
x = torch.ones(1 << 22)
torch.set_num_threads(2)
counter.start()
for _ in range(5):
    x.add_(1.0)  # big enough for torch to split over the threads
parallel = counter.read()
torch.set_num_threads(1)  # one thread: torch runs the work inline, no region
counter.start()
for _ in range(5):
    x.add_(1.0)
alone = counter.read()
print(parallel[0], parallel[1], alone[0], counter.empty_region_s(2))
"""


def test_the_preloaded_shim_counts_every_parallel_region_and_times_an_empty_one():
    env = {**os.environ, "LD_PRELOAD": str(omp_regions.shim_path())}
    out = subprocess.run(
        [sys.executable, "-c", REGIONS_PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    regions, seconds, alone, empty_s = int(out[0]), float(out[1]), int(out[2]), float(out[3])
    assert regions >= 5  # one region per add at least
    assert seconds > 0
    assert alone == 0
    assert 0 < empty_s < 1e-3


def test_without_the_shim_there_are_no_counters():
    assert omp_regions.preloaded() is None
