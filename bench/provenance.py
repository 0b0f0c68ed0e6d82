"""What every number is recorded with: the commit, whether the tree was dirty, the machine (its
class, bench/machine.py, and its measured read bandwidth) and the library versions. A number
without these cannot be compared with anything."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import psutil

from bench import machine
from bench.servers import ROOT


def git_facts(root: Path = ROOT) -> dict:
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")  # untracked files count: they may be code
    return {"commit": commit, "dirty": bool(status) if commit else None}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def machine_facts() -> dict:
    """The machine a run was measured on; `machine_class` says which runs it compares with."""
    cpu, cores = machine.read_cpu(), machine.usable_cores()
    return {
        "machine_class": machine.machine_class(cpu, cores),
        "cpu_model": _cpu_model(cpu),
        "cpu_vendor": cpu.vendor,
        "cpu_family": cpu.family,
        "cpu_model_number": cpu.model,
        "isa": list(cpu.isa),
        "cores": cores,  # the CPUs the bench may use (its affinity)
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "device": _device(),
        "os": platform.platform(),
        "load_avg_1m": load_average(),
        "python": platform.python_version(),
        "read_gbps": read_bandwidth_gbps(),
    }


def read_bandwidth_gbps(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """The machine's memory read bandwidth, GB/s: torch sums a 1 GiB float32 tensor on all its
    threads, best of five (a plain streaming read, as decoding's weight reads are)."""
    import torch

    data = torch.ones(size_bytes // 4)
    data.sum()  # touch every page once
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return round(size_bytes / best / 1e9, 1)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class ForeignCpu:
    """The share of the machine's CPU that other processes used over an interval.

    Other work skews every timing, and a load average cannot tell it from the bench's own
    threads. So: all busy CPU time on the machine, minus the harness's own, its waited-for
    children's (the load generator) and the server's, over wall time times cores.
    """

    def __init__(self, server_cpu_s: Callable[[], float]) -> None:
        self._server_cpu_s = server_cpu_s
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        me = psutil.Process().cpu_times()
        ours = me.user + me.system + me.children_user + me.children_system + self._server_cpu_s()
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        return time.monotonic(), busy, ours

    def share(self) -> float | None:
        """Call after the load generator has been waited for, so its CPU time is counted."""
        wall, busy, ours = (b - a for a, b in zip(self._start, self._sample(), strict=True))
        if wall <= 0:
            return None
        return round(max(0.0, (busy - ours) / (wall * (os.cpu_count() or 1))), 3)


def _cpu_model(cpu: machine.Cpu) -> str:
    if cpu.model_name != machine.UNKNOWN:
        return cpu.model_name
    return platform.processor() or machine.UNKNOWN


def _device() -> str:
    """What the servers will run on with device=auto (they pick CUDA when there is one)."""
    import torch  # slow to import, so only here

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return "cpu"


def library_versions() -> dict:
    names = ("torch", "transformers", "locust", "starlette", "uvicorn")
    return {name: _version(name) for name in names}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
