"""Step 7's torch thread (speed/torch_thread.py): in a real server on the real model, every
OpenMP parallel region is opened by one thread, so OpenMP keeps one team and lets its workers
spin. Counted by bench/omp_regions.c preloaded into the server process; with the knob off, the
model is loaded on the event loop's thread and the forward passes run on another: two teams.
And `apart`: a thread that ends with its work, an error handed back, a caller that leaves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from bench import omp_regions
from step7_real_kv.speed import torch_thread


def served_threads(
    start_server, tmp_path, step: str = "step7_real_kv", **env: str
) -> tuple[int, int, float]:
    """Regions opened, the threads that opened them and the drafts verified (step 8), in a step's
    server that answered four concurrent chats that copy their prompt, on the real model, and
    was stopped (SIGTERM)."""
    report = tmp_path / f"regions-{step}-{len(env)}.txt"
    server = start_server(
        step,
        LD_PRELOAD=str(omp_regions.shim_path()),
        OMP_REGIONS_REPORT=str(report),
        OMP_NUM_THREADS="2",
        **env,
    )
    client = OpenAI(base_url=server.url + "/v1", api_key="none")

    def chat(i: int) -> str:
        content = f"Repeat: the {i + 2} red apples sat on the table."
        answer = client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": content}],
            max_tokens=16,
            temperature=0,
        )
        return answer.choices[0].message.content or ""

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(chat, range(4)))
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    verified = sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "gateway_spec_verifications_total"
    )
    server.stop()
    assert server.proc.returncode == 0, server.log()
    regions, threads = (int(n) for n in report.read_text().split())
    return regions, threads, verified


@pytest.mark.integration
@pytest.mark.parametrize("step", ["step7_real_kv", "step8_speculative"])
def test_one_thread_opens_every_parallel_region_in_the_server(start_server, tmp_path, step):
    """Step 8 too: its drafts' row costs are timed, and its drafts verified, on that thread."""
    regions, threads, verified = served_threads(start_server, tmp_path, step)
    assert regions > 100  # loading, building the engine and the forward passes all split work
    assert threads == 1
    if step == "step8_speculative":
        assert verified > 0  # the verify path ran, and on that one thread


@pytest.mark.integration
def test_with_the_knob_off_two_threads_open_regions(start_server, tmp_path):
    regions, threads, _ = served_threads(start_server, tmp_path, GATEWAY_TORCH_THREAD="false")
    assert regions > 100
    assert threads >= 2  # what the torch thread is for


def test_run_and_call_use_the_one_torch_thread():
    async def where() -> str:
        return await torch_thread.run(lambda: threading.current_thread().name)

    assert asyncio.run(where()) == torch_thread.call(lambda: threading.current_thread().name)
    assert asyncio.run(where()).startswith("torch")


def test_apart_runs_on_a_thread_that_ends_and_hands_back_errors():
    async def go():
        seen: list[threading.Thread] = []

        def work(x: int) -> int:
            seen.append(threading.current_thread())
            return x + 1

        assert await torch_thread.apart(work, 1) == 2
        seen[0].join(timeout=5)
        assert not seen[0].is_alive()  # its OpenMP team ends with it

        def fail() -> None:
            raise ValueError("no room")

        with pytest.raises(ValueError, match="no room"):
            await torch_thread.apart(fail)

    asyncio.run(go())


def test_a_caller_that_leaves_does_not_break_the_thread_that_finishes_later():
    async def go():
        let_go = threading.Event()
        task = asyncio.ensure_future(torch_thread.apart(let_go.wait, 5))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        let_go.set()
        await asyncio.sleep(0.1)  # the thread settles a future nobody awaits: no error

    asyncio.run(go())


SPIN_PROBE = """
import importlib.abc, os, sys
seen = []  # GOMP_SPINCOUNT as torch (and with it libgomp, which reads it once) starts to load

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT", "unset"))

sys.meta_path.insert(0, Watch())
import step7_real_kv
import torch
print(seen[0], os.environ.get("GOMP_SPINCOUNT", "unset"))
"""


@pytest.mark.parametrize(
    "given, expected",
    [(None, ["10000", "unset"]), ("300000", ["300000", "300000"])],  # given: left to libgomp
)
def test_the_spin_count_is_set_only_while_torch_loads_and_a_given_one_wins(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    out = subprocess.run(
        [sys.executable, "-c", SPIN_PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == expected  # torch loaded with it set, and nothing left for child processes
