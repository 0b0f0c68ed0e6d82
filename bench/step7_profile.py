"""`python -m bench.step7_profile`: where one step 7 iteration's time goes, measured in-process.

Builds step 7's engine on the real model (float32, the server's defaults), fills it with N
sequences made from the bench's workload (the same chat prompts the bench sends, EOS ignored so
that N keep running), lets every prompt prefill, then times decode iterations. Each part of an
iteration is timed by wrapping the function that does it, from here: the shipped code carries no
profiling hooks. torch ops on the CPU are synchronous, so a wall-clock timer around a call is
the time of that call. A second pass runs torch.profiler over the same iterations and lists the
heaviest aten ops, for the reader who wants to go one level down.

    python -m bench.step7_profile --users 1,16,64 --iterations 20
    python -m bench.step7_profile --users 16 --json bench/charts/step7-profile.json
    python -m bench.step7_profile --prefill 1500 --repeats 5

`--cores` samples instead how busy each core and each thread is during decode iterations (every
1 ms, from a separate process: bench/cores.py) and draws it (bench/cores_chart.py), with the
share of each iteration with 2, 1 and 0 cores busy:

    python -m bench.step7_profile --cores --users 16,64
    python -m bench.step7_profile --cores --server http://127.0.0.1:8000 --pid PID --seconds 5

With `--server` it samples a running step 7 server's process instead, while a load runs against
it (`python -m bench.loadgen --host URL --users 16 --run-time 30`), and takes the iterations'
start and end from its GET /debug/timeline: the same numbers with the HTTP side in the process.

`--prefill N` profiles a long prompt instead: one unique prompt of N tokens at a time into an
idle engine, answered with one token (the bench's long-prompt workload, in-process), so that
the time is the prefill's: its chunks, each part of them, and the prompt tokens per second.

What it cannot see: the HTTP side (the event loop writing SSE, uvicorn) and the waits between
the loop and the worker thread. For those, profile the running server under the bench's load
with py-spy (bench/README.md, "Profiling step 7").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import torch
import torch.nn.functional as F

from bench import cores, cores_chart, machine, omp_regions, provenance
from bench.workload import load_workload
from common.config import ServerConfig
from common.model import LoadedModel, load_model
from common.request import Request
from common.sampling import SamplingParams
from step7_real_kv import attention, engine, model_runner
from step7_real_kv.engine import EngineConfig, PagedEngine
from step7_real_kv.speed import torch_thread
from step7_real_kv.speed.linear import FastLinear, time_paths

PARTS = (
    "schedule",
    "batch tensors",
    "embedding + rope tables",
    "residual add + rms norm",
    "final rms norm",
    "qkv projection",
    "rotary + kv write",
    "attention: gather",
    "attention: sdpa",
    "attention: C++ kernel",
    "o projection",
    "mlp: gate/up",
    "mlp: silu * up",
    "mlp: down",
    "lm head",
    "sampling",
    "append token (detokenize, stops)",
    "name full blocks",
)


OTHER = "other (python between ops, loop, thread hop)"


class Timer:
    """Seconds per label, summed over the timed iterations; nested labels are not subtracted."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.matmuls: dict[str, int] = defaultdict(int)  # calls by the path that ran them
        self.on = False

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        return timed


def _linear_label(lm: LoadedModel) -> Callable[[torch.Tensor], str]:
    """Which projection an F.linear call is, from its weight's shape."""
    c = lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    by_rows = {
        qkv: "qkv projection",
        2 * c.intermediate_size: "mlp: gate/up",
        c.vocab_size: "lm head",
    }

    def label(weight: torch.Tensor) -> str:
        if weight.shape[0] in by_rows:
            return by_rows[weight.shape[0]]
        return "mlp: down" if weight.shape[1] == c.intermediate_size else "o projection"

    return label


def matmul_path(linear: model_runner.Matmul, rows: int) -> str:
    """Which path a matmul of `rows` rows takes: FastLinear's own choice, or the reference's."""
    return linear.path(rows) if isinstance(linear, FastLinear) else "F.linear"


@contextmanager
def instrumented(lm: LoadedModel, eng: PagedEngine, timer: Timer) -> Iterator[None]:
    """Wrap the engine's parts in timers; put everything back afterwards."""
    label = _linear_label(lm)

    def timed_call(cls: type) -> Callable:
        call = cls.__call__

        def linear(self: model_runner.Linear | FastLinear, x: torch.Tensor) -> torch.Tensor:
            if timer.on:
                timer.matmuls[matmul_path(self, x.shape[0])] += 1
            return timer.wrap(label(self.weight), call)(self, x)

        return linear

    fake_f = SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if name[0] != "_"})
    fake_f.embedding = timer.wrap("embedding + rope tables", F.embedding)
    ops = eng.runner.ops  # model_runner.TorchOps, or the speed layer's KernelOps
    patches = [
        (ops, "rope_and_store", timer.wrap("rotary + kv write", ops.rope_and_store)),
        (ops, "silu_mul", timer.wrap("mlp: silu * up", ops.silu_mul)),
        (eng.runner, "add_norm", timer.wrap("residual add + rms norm", eng.runner.add_norm)),
        (model_runner.Linear, "__call__", timed_call(model_runner.Linear)),
        (FastLinear, "__call__", timed_call(FastLinear)),
        (model_runner, "F", fake_f),
        (model_runner, "rms_norm", timer.wrap("final rms norm", model_runner.rms_norm)),
        (eng.kv, "gather", timer.wrap("attention: gather", eng.kv.gather)),
        (attention, "decode_attention", timer.wrap("attention: sdpa", attention.decode_attention)),
        (
            attention,
            "prefill_attention",
            timer.wrap("attention: sdpa", attention.prefill_attention),
        ),
        (engine, "build_batch", timer.wrap("batch tensors", engine.build_batch)),
        (eng.scheduler, "schedule", timer.wrap("schedule", eng.scheduler.schedule)),
        (
            eng.scheduler,
            "advance",
            timer.wrap("name full blocks", eng.scheduler.advance),
        ),
    ]
    if ops.decode_kernel is not None:  # the C++ kernel; the torch code is gather, then sdpa
        patches.append(
            (ops, "decode_kernel", timer.wrap("attention: C++ kernel", ops.decode_kernel))
        )
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def make_requests(lm: LoadedModel, users: int, max_tokens: int) -> list[Request]:
    """The bench's chat prompts, round-robin, greedy; EOS ignored so that they keep running."""
    workload = load_workload()
    requests = []
    for i in range(users):
        prompt = workload.prompts[i % len(workload.prompts)]
        ids = lm.tokenizer.apply_chat_template(
            workload.messages(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        params = SamplingParams(temperature=0.0)
        prompt_ids = cast(list[int], ids)  # tokenize=True, return_dict=False: token ids
        requests.append(Request(prompt_ids, params, max_tokens, lm.tokenizer, eos_token_ids=set()))
    return requests


def time_request_side(requests: list[Request], timer: Timer) -> None:
    """Sampling and append_token run per sequence: wrap each request's own methods."""
    for request in requests:
        request.sample = timer.wrap("sampling", request.sample)  # type: ignore[method-assign]
        request.append_token = timer.wrap(  # type: ignore[method-assign]
            "append token (detokenize, stops)", request.append_token
        )


async def profile_level(
    lm: LoadedModel, users: int, iterations: int, ops: int, config: EngineConfig
) -> dict:
    eng = await new_engine(lm, config)
    timer = Timer()
    requests = make_requests(lm, users, max_tokens=iterations + 64)
    time_request_side(requests, timer)
    for request in requests:
        await eng.submit(request)
    with instrumented(lm, eng, timer):
        while eng.scheduler.waiting or any(
            s.num_computed < s.request.num_prompt_tokens for s in eng.scheduler.running
        ):
            await eng.step()  # prefill every prompt first: the profile is of decoding
        for _ in range(3):  # warm-up decode iterations
            await eng.step()
        timer.on = True
        started = time.perf_counter()
        for _ in range(iterations):
            await eng.step()
        wall = time.perf_counter() - started
        timer.on = False
        top_ops = await aten_ops(eng, ops) if ops else []
    failed = [r.request_id for r in requests if r.finished]
    if failed or len(eng.scheduler.running) != users:  # the profile must be of healthy work
        raise RuntimeError(f"{len(failed)} requests ended early: see the log above")
    per_iteration = {part: 1000 * timer.seconds[part] / iterations for part in PARTS}
    timed = sum(per_iteration.values())
    per_iteration[OTHER] = 1000 * wall / iterations - timed
    return {
        "users": users,
        "running": len(eng.scheduler.running),
        "iteration_ms": 1000 * wall / iterations,
        "tokens_per_s": users * iterations / wall,
        "parts_ms": per_iteration,
        "matmuls": {path: n / iterations for path, n in sorted(timer.matmuls.items())},
        "backends": eng.runner.backends,
        "top_aten_ops": top_ops,
    }


async def new_engine(lm: LoadedModel, config: EngineConfig) -> PagedEngine:
    """The engine, built where the server builds it (on the torch thread, unless turned off)."""
    return await torch_thread.where(config.torch_thread)(PagedEngine, lm, config)


async def decoding(
    lm: LoadedModel, users: int, max_tokens: int, config: EngineConfig
) -> PagedEngine:
    """An engine with `users` sequences past their prompts and a few decode iterations run."""
    eng = await new_engine(lm, config)
    for request in make_requests(lm, users, max_tokens):
        await eng.submit(request)
    while eng.scheduler.waiting or any(
        s.num_computed < s.request.num_prompt_tokens for s in eng.scheduler.running
    ):
        await eng.step()
    for _ in range(3):  # warm-up: oneDNN's first calls at these shapes, the pool's threads
        await eng.step()
    return eng


def watch_compute(eng: PagedEngine, saw: Callable[[int], object]) -> None:
    """Tells `saw` the native id of each thread that runs one of the engine's forward passes."""
    compute = eng._compute

    def on_its_thread(*args: Any) -> Any:
        saw(threading.get_native_id())
        return compute(*args)

    eng._compute = on_its_thread  # type: ignore[method-assign,assignment]


async def profile_cores(lm: LoadedModel, users: int, iterations: int, config: EngineConfig) -> dict:
    """`iterations` decode iterations at `users`, each thread's time on CPU sampled meanwhile."""
    eng = await decoding(lm, users, iterations + 64, config)
    named = {threading.get_native_id(): "event loop"}
    watch_compute(eng, lambda thread: named.__setitem__(thread, "calls the ops"))
    sampler = cores.Sampler(cores.threads_of(os.getpid()))
    sampler.start()
    bounds = []
    for _ in range(iterations):
        start = time.monotonic()
        await eng.step()
        bounds.append((start, time.monotonic()))
    samples = sampler.stop()
    if len(eng.scheduler.running) != users:  # the picture must be of healthy work
        raise RuntimeError("requests ended early: see the log above")
    cpus = sorted(os.sched_getaffinity(0))
    record = cores.level_record(samples, bounds, named, cpus)
    window = samples[-1]["t"] - samples[0]["t"]
    return {"users": users, "sampler_cpu_share": sampler.cpu_s / window, **record}


async def profile_regions(
    lm: LoadedModel, users: int, iterations: int, config: EngineConfig, counter: omp_regions.Counter
) -> dict:
    """`iterations` decode iterations at `users`: OpenMP regions entered, time in and between."""
    eng = await decoding(lm, users, iterations + 64, config)
    threads: set[int] = set()  # the threads that ran the forward passes: one OpenMP team each
    watch_compute(eng, threads.add)
    counter.start()
    started = time.perf_counter()
    for _ in range(iterations):
        await eng.step()
    wall = time.perf_counter() - started
    regions, inside = counter.read()
    if len(eng.scheduler.running) != users:  # the count must be of healthy work
        raise RuntimeError("requests ended early: see the log above")

    def empty_here() -> tuple[int, float]:  # on the thread of the forward passes, its team warm
        return threading.get_native_id(), counter.empty_region_s(torch.get_num_threads())

    where, empty = await eng._off_loop(empty_here)  # where the forward passes ran
    return {
        "users": users,
        "iteration_ms": 1000 * wall / iterations,
        "regions_per_iteration": regions / iterations,
        "in_regions_ms": 1000 * inside / iterations,
        "between_regions_ms": 1000 * (wall - inside) / iterations,
        "compute_threads": len(threads),
        "empty_region_on_compute_thread": where in threads,
        "empty_region_us": 1e6 * empty,
        "fork_join_ms": 1000 * empty * regions / iterations,
    }


def run_regions(lm: LoadedModel, levels: list[int], iterations: int, config: EngineConfig,
                counter: omp_regions.Counter, path: Path | None) -> None:  # fmt: skip
    """--regions: each level's counts, printed as a table and written to `path`."""
    results = [
        asyncio.run(profile_regions(lm, users, iterations, config, counter)) for users in levels
    ]
    print("| sequences | iteration ms | regions | in regions ms | between ms | empty region us "
          "| fork + join ms |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['users']} | {r['iteration_ms']:.1f} | {r['regions_per_iteration']:.0f} | "
              f"{r['in_regions_ms']:.1f} | {r['between_regions_ms']:.1f} | "
              f"{r['empty_region_us']:.2f} | {r['fork_join_ms']:.2f} |")  # fmt: skip
    if path is not None:
        record = {
            "command": shlex.join(["python", "-m", "bench.step7_profile", *sys.argv[1:]]),
            "machine": provenance.machine_facts(),
            "git": provenance.git_facts(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))},
            "levels": results,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}")


def server_cores(url: str, pid: int, seconds: float) -> dict:
    """A running server's threads sampled for `seconds`; its iterations from its timeline."""
    sampler = cores.Sampler(cores.threads_of(pid), pid=pid)
    sampler.start()
    time.sleep(seconds)
    samples = sampler.stop()
    trace = httpx.get(f"{url}/debug/timeline", timeout=30).raise_for_status().json()
    t0, t1 = samples[0]["t"], samples[-1]["t"]
    bounds = [(s, e) for s, e in cores.trace_iterations(trace) if t0 <= s and e <= t1]
    if not bounds:
        raise SystemExit("no iteration ran while sampling: is a load running against it?")
    sequences = [e["args"]["sequences"] for e in trace["traceEvents"]
                 if e["ph"] == "X" and e["pid"] == 1 and e["name"].startswith("iteration ")
                 and t0 <= trace["otherData"]["origin_s"] + e["ts"] / 1e6]  # fmt: skip
    cpus = sorted(os.sched_getaffinity(pid))
    record = cores.level_record(samples, bounds, {}, cpus, other="server thread")
    users = round(sum(sequences) / max(len(sequences), 1))  # sequences per iteration, mean
    return {"users": users, "sampler_cpu_share": sampler.cpu_s / (t1 - t0), **record}


def run_cores(lm: LoadedModel | None, levels: list[int], iterations: int,
              config: EngineConfig, out: Path, server: dict | None = None) -> None:  # fmt: skip
    """--cores: every level's record into out/cores.json, its picture into out/cores.png
    (out/cores-server.* for a server's)."""
    if server is not None:
        results, name = [server_cores(**server)], "cores-server"
    else:
        assert lm is not None
        results = [asyncio.run(profile_cores(lm, users, iterations, config)) for users in levels]
        name = "cores"
    record = {
        "command": shlex.join(["python", "-m", "bench.step7_profile", *sys.argv[1:]]),
        "machine": provenance.machine_facts(),
        "git": provenance.git_facts(),
        "torch": torch.__version__,
        "source": "server" if server else "in-process",
        "threads": None if server else torch.get_num_threads(),  # a server's: its own config
        "period_s": 0.001,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
        "levels": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    record = json.loads((out / f"{name}.json").read_text())  # as a reader of the file sees it
    cores_chart.draw(record, out / f"{name}.png")
    print_cores(record["levels"])
    print(f"wrote {out / name}.json and {out / name}.png")


def print_cores(levels: list[dict]) -> None:
    print("| users | iteration (ms) | 2 cores busy | 1 core | 0 cores | per core | threads ready "
          "but off a core | sampler |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for lv in levels:
        busy = lv["summary"]["cores_busy"]
        per_core = ", ".join(f"{100 * v:.0f}%" for v in lv["summary"]["core_busy"].values())
        print(f"| {lv['users']} | {lv['iteration_ms']:.1f} | {100 * busy['2']:.0f}% | "
              f"{100 * busy['1']:.0f}% | {100 * busy['0']:.0f}% | {per_core} | "
              f"{100 * lv['summary']['ready_waiting']['threads']:.0f}% | "
              f"{100 * lv['sampler_cpu_share']:.0f}% of a core |")  # fmt: skip


def unique_prompt(lm: LoadedModel, tokens: int, seed: int) -> list[int]:
    """`tokens` ids drawn from the vocabulary by `seed`: a prompt that shares no prefix with
    another seed's, so the prefix cache never shortens its prefill."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(lm.config.vocab_size)
    return torch.randint(1000, vocab, (tokens,), generator=generator).tolist()


async def prefill_once(eng: PagedEngine, request: Request) -> tuple[float, float, int]:
    """One request alone through the engine until its first token: seconds of wall clock and
    of this process's CPU time (on a shared machine the steadier of the two), iterations."""
    await eng.submit(request)
    started, cpu, iterations = time.perf_counter(), time.process_time(), 0
    while not request.finished:
        await eng.step()
        iterations += 1
    return time.perf_counter() - started, time.process_time() - cpu, iterations


async def profile_prefill(
    lm: LoadedModel, tokens: int, repeats: int, ops: int, config: EngineConfig
) -> dict:
    """`repeats` unique prompts of `tokens` tokens, one after another (one warm-up first),
    each answered with one token: the median prefill and each part's median, in ms."""
    eng = await new_engine(lm, config)
    params = SamplingParams(temperature=0.0)

    def request(seed: int) -> Request:
        return Request(unique_prompt(lm, tokens, seed), params, 1, lm.tokenizer, set())

    await prefill_once(eng, request(0))  # warm-up: oneDNN's first calls at these shapes
    walls, cpus, parts, timer = [], [], defaultdict(list), Timer()
    with instrumented(lm, eng, timer):
        for seed in range(1, repeats + 1):
            timer.seconds.clear()
            timer.on = True
            wall, cpu, iterations = await prefill_once(eng, request(seed))
            timer.on = False
            walls.append(wall)
            cpus.append(cpu)
            for part in PARTS:
                parts[part].append(1000 * timer.seconds[part])
            parts[OTHER].append(1000 * wall - sum(timer.seconds[p] * 1000 for p in PARTS))
        top_ops = await prefill_aten_ops(eng, request(repeats + 1), ops) if ops else []
    wall = median(walls)
    return {
        "prompt_tokens": tokens,
        "iterations": iterations,
        "chunk_tokens": eng.scheduler.max_prefill_tokens,  # max_num_batched_tokens, or more
        "prefill_ms": 1000 * wall,
        "prefill_ms_all": [round(1000 * w, 1) for w in walls],
        "cpu_ms": 1000 * median(cpus),
        "threads": torch.get_num_threads(),
        "prompt_tokens_per_s": tokens / wall,
        "parts_ms": {part: median(values) for part, values in parts.items()},
        "matmuls": {path: n / repeats for path, n in sorted(timer.matmuls.items())},
        "backends": eng.runner.backends,
        "top_aten_ops": top_ops,
    }


async def prefill_aten_ops(eng: PagedEngine, request: Request, count: int) -> list[dict]:
    """torch.profiler over one more prefill: the heaviest aten ops by self CPU time. The
    engine's forward runs on this thread meanwhile: the profiler records the thread it
    started on, not asyncio.to_thread's worker."""

    async def inline(fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    saved, asyncio.to_thread = asyncio.to_thread, inline
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            await prefill_once(eng, request)
    finally:
        asyncio.to_thread = saved
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3}
        for e in events[:count]
    ]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def print_prefill(result: dict) -> None:
    print(f"| part | ms per {result['prompt_tokens']}-token prefill (median) |")
    print("| --- | --- |")
    for part, ms in result["parts_ms"].items():
        if ms >= 0.05:
            print(f"| {part} | {ms:.1f} |")
    print(f"| **prefill (ms)** | **{result['prefill_ms']:.1f}** |")
    print(f"| prompt tokens/s | {result['prompt_tokens_per_s']:.0f} |")
    print(f"| CPU time (ms, {result['threads']} threads) | {result['cpu_ms']:.0f} |")
    print(f"\n{result['iterations']} iterations of up to {result['chunk_tokens']} tokens; "
          f"every run (ms): {result['prefill_ms_all']}")  # fmt: skip
    for op in result["top_aten_ops"]:
        print(f"  {op['self_ms']:8.1f} ms  {op['calls']:5d} calls  {op['op']}")


async def aten_ops(eng: PagedEngine, count: int, iterations: int = 5) -> list[dict]:
    """torch.profiler over a few more iterations: the heaviest aten ops by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            await eng.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "calls": e.count // iterations, "self_ms": e.self_cpu_time_total / 1e3 / 5}
        for e in events[:count]
    ]


def linear_rows(lm: LoadedModel, config: EngineConfig, most: int, repeats: int = 30) -> list[dict]:
    """Where the stored blocks stop paying: every matmul of one token's forward pass (30
    layers' q/k/v, o, gate/up and down, and the vocabulary projection, in the forward's order,
    so that each weight comes from memory as in a decode step, not from a warm cache), timed
    at 1 to `most` rows through block_linear over the GGUF blocks and through oneDNN's
    prepacked float32, the two alternating (this machine's speed drifts). ms per forward
    pass, median of `repeats`: the engine's own measurement at start-up (`block_rows` 0), at
    every row count."""
    runner = PagedEngine(lm, dataclasses.replace(config, block_rows=1)).runner
    linears = [*runner.linears[1:], runner.lm_head]  # the layers', then the vocabulary's
    matrices = [m for m in linears if isinstance(m, FastLinear) and m.both_ways]
    if len(matrices) < len(linears):
        raise SystemExit("--linear-rows needs the C++ kernels, the stored blocks and oneDNN")
    rows_out = []
    for rows in range(1, most + 1):
        med = time_paths(matrices, rows, repeats)
        rows_out.append({"rows": rows, **med})
        print(f"{rows} rows: blocks {med['blocks']:.2f} ms, onednn {med['onednn']:.2f} ms",
              flush=True)  # fmt: skip
    return rows_out


def print_table(results: list[dict]) -> None:
    header = "| part | " + " | ".join(f"{r['users']} users" for r in results) + " |"
    print(header)
    print("| --- |" + " --- |" * len(results))
    rows = [*PARTS, OTHER]
    for part in rows:
        cells = " | ".join(f"{r['parts_ms'][part]:.1f}" for r in results)
        print(f"| {part} | {cells} |")
    cells = " | ".join(f"**{r['iteration_ms']:.1f}**" for r in results)
    print(f"| **iteration (ms)** | {cells} |")
    cells = " | ".join(f"{r['tokens_per_s']:.1f}" for r in results)
    print(f"| decode tokens/s | {cells} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step7_profile", description=__doc__)
    p.add_argument("--users", default="1,16,64", help="sequences decoding at once, e.g. 1,16,64")
    p.add_argument("--iterations", type=int, default=20, help="decode iterations timed per level")
    p.add_argument("--ops", type=int, default=0, help="also list the N heaviest aten ops")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--linear-backend", default="auto", help="as step 7's --linear-backend")
    p.add_argument("--kernels", default="auto", help="as step 7's --kernels")
    p.add_argument("--weight-format", default="auto", help="as step 7's --weight-format")
    p.add_argument(
        "--linear-rows",
        type=int,
        default=0,
        help="instead: time one token's matmuls at 1..N rows, stored blocks against oneDNN",
    )
    p.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="instead: profile the prefill of unique prompts of N tokens, one at a time",
    )
    p.add_argument("--repeats", type=int, default=5, help="prompts timed for --prefill")
    p.add_argument(
        "--max-prefill-tokens", type=int, default=0, help="as step 7's --max-prefill-tokens"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--torch-thread", choices=("true", "false"), default="true", help="as step 7's knob"
    )
    p.add_argument(
        "--cores",
        action="store_true",
        help="instead: sample each thread's and core's busy time during decode iterations",
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench/charts/step7-cores"), help="where --cores writes"
    )
    p.add_argument("--server", help="with --cores: a running step 7 server's URL to sample")
    p.add_argument("--pid", type=int, default=0, help="with --server: its process id")
    p.add_argument("--seconds", type=float, default=5.0, help="with --server: seconds sampled")
    p.add_argument(
        "--regions",
        action="store_true",
        help="instead: count OpenMP's parallel regions per decode iteration and the time in and "
        "between them (bench/omp_regions.py; runs itself again with a shim preloaded)",
    )
    args = p.parse_args(argv)
    counter = None
    if args.regions:
        lib = omp_regions.preloaded()
        if lib is None:
            again = sys.argv[1:] if argv is None else argv
            omp_regions.rerun_preloaded("bench.step7_profile", again)
        assert lib is not None
        counter = omp_regions.Counter(lib)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cores and args.server:
        if not args.pid:
            p.error("--server needs --pid, the server's process id")
        server = {"url": args.server.rstrip("/"), "pid": args.pid, "seconds": args.seconds}
        return run_cores(None, [], 0, EngineConfig(), args.out, server)
    on_it = torch_thread.call if args.torch_thread == "true" else (lambda fn, *a: fn(*a))
    lm = on_it(load_model, ServerConfig(dtype="float32"))  # where the server loads it
    config = EngineConfig(
        linear_backend=args.linear_backend,
        kernels=args.kernels,
        weight_format=args.weight_format,
        max_prefill_tokens=args.max_prefill_tokens,
        torch_thread=args.torch_thread == "true",
    )
    if args.cores:
        levels = [int(u) for u in args.users.split(",")]
        return run_cores(lm, levels, args.iterations, config, args.out)
    if counter is not None:
        levels = [int(u) for u in args.users.split(",")]
        return run_regions(lm, levels, args.iterations, config, counter, args.json)
    if args.prefill:
        result = asyncio.run(profile_prefill(lm, args.prefill, args.repeats, args.ops, config))
        print_prefill(result)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            run = {"machine_class": machine.this_machine(), "torch": torch.__version__}
            args.json.write_text(json.dumps({"meta": run, **result}, indent=2))
        return
    if args.linear_rows:
        table = on_it(linear_rows, lm, config, args.linear_rows)
        print("| rows | stored blocks (ms) | oneDNN float32 (ms) | faster |")
        print("| --- | --- | --- | --- |")
        for r in table:
            faster = "blocks" if r["blocks"] < r["onednn"] else "oneDNN"
            print(f"| {r['rows']} | {r['blocks']:.2f} | {r['onednn']:.2f} | {faster} |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            meta = {"machine": provenance.machine_facts(), **provenance.git_facts(),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads()}  # fmt: skip
            args.json.write_text(json.dumps({"meta": meta, "linear_rows": table}, indent=2))
        return
    results = []
    for users in (int(u) for u in args.users.split(",")):
        result = asyncio.run(profile_level(lm, users, args.iterations, args.ops, config))
        results.append(result)
        paths = ", ".join(f"{n:g} {path}" for path, n in result["matmuls"].items())
        print(f"{users} users: {result['iteration_ms']:.1f} ms per iteration; matmuls per "
              f"iteration: {paths}", flush=True)  # fmt: skip
    print_table(results)
    for result in results:
        if result["top_aten_ops"]:
            print(f"\nheaviest aten ops at {result['users']} users (ms per iteration, self):")
            for op in result["top_aten_ops"]:
                print(f"  {op['self_ms']:8.2f}  {op['calls']:5d} calls  {op['op']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine_class": machine.this_machine(),  # compare only files of one class
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "linear_backend": args.linear_backend,
            "kernels": args.kernels,
            "weight_format": args.weight_format,
        }
        args.json.write_text(json.dumps({"meta": meta, "levels": results}, indent=2))


if __name__ == "__main__":
    main()
