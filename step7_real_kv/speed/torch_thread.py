"""One thread for every torch op that splits over the cores, so OpenMP's workers stay awake.

torch, oneDNN and the C++ kernels split an op over the cores in an OpenMP parallel region: the
calling thread wakes its team of workers, all of them work, and it waits for the last. libgomp
gives every thread that opens a region a team of its own, and once its teams hold more threads
than there are cores, it stops letting idle workers spin: each one sleeps as soon as a region
ends, and the next region waits for it to wake. With the model loaded on one thread and the
forward passes run on another, two cores have two teams: an empty region then took about 40 us
instead of under 1, and an iteration opens 150-310 regions (step 7's README, `python -m
bench.step7_profile --regions`).

So one thread loads the model, builds the engine and runs every forward pass (`run`, `call`;
`--torch-thread false` goes back to the event loop's thread and asyncio.to_thread's).
Work that must not wait behind a forward pass (step 10's copies of KV blocks) runs on a thread
of its own that ends with it (`apart`): a thread's team ends with the thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")


async def run(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on the torch thread, awaited from the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(TORCH_THREAD, functools.partial(fn, *args))


async def inline(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) right here, on the calling thread (`--torch-thread false`)."""
    return fn(*args)


def where(enabled: bool) -> Callable[..., Any]:
    """Where a server loads the model and builds its engine: `run` with the torch thread (the
    knob `torch_thread`), else `inline`."""
    return run if enabled else inline


def call(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on the torch thread, from a thread without an event loop (start-up, scripts)."""
    return TORCH_THREAD.submit(fn, *args).result()


async def apart(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a new thread that ends when it returns (and its OpenMP team with it)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-apart")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))
    finally:
        pool.shutdown(wait=False)  # its thread ends once fn returns, even if the caller left
