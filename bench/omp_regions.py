"""OpenMP's parallel regions during step 7's decode iterations: how many, how long in them,
how long between them, and what a region's fork and join cost alone.

torch's ops, oneDNN's matmuls and step 7's C++ kernels each split their work over the threads
in a parallel region: the threads are woken (fork), work, and wait for the last (join). On two
cores, the time outside every region is time one core works alone: Python between the ops,
ops too small to split, the hop to the worker thread. `omp_regions.c`, preloaded ahead of
libgomp, counts and times every region; `bench.step7_profile --regions` reads it:

    python -m bench.step7_profile --regions --users 1,16,64 --iterations 20

(it builds the shim with gcc into the gateway's cache and runs itself again with it preloaded).
Any process can carry it: `LD_PRELOAD=<shim_path()> OMP_REGIONS_REPORT=out.txt python -m
step7_real_kv` writes "regions threads" to out.txt as the server exits, the threads being how
many opened a region (each with a team of its own; step 7's speed/torch_thread.py keeps it at 1).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from common.config import default_cache_dir

SOURCE = Path(__file__).with_name("omp_regions.c")


def shim_path() -> Path:
    """The shim built from this source, compiled on first use."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source).hexdigest()[:16]
    path = default_cache_dir() / "omp_regions" / f"omp_regions_{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["gcc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"]
        subprocess.run(cmd, check=True)
        tmp.replace(path)
    return path


def preloaded() -> ctypes.CDLL | None:
    """The shim's counters, when this process runs with it preloaded."""
    process = ctypes.CDLL(None)
    if not hasattr(process, "omp_regions_count"):
        return None
    process.omp_regions_count.restype = ctypes.c_long
    process.omp_regions_ns.restype = ctypes.c_long
    process.omp_regions_masters.restype = ctypes.c_long
    process.omp_regions_empty.restype = ctypes.c_double
    process.omp_regions_empty.argtypes = [ctypes.c_long, ctypes.c_uint]
    return process


def rerun_preloaded(module: str, argv: list[str]) -> None:
    """Replace this process with `python -m module argv` and the shim preloaded."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(shim_path()), env.get("LD_PRELOAD")]))
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


class Counter:
    """Regions entered and nanoseconds spent in them since `start`."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.regions = self.ns = 0

    def start(self) -> None:
        self.regions, self.ns = self.lib.omp_regions_count(), self.lib.omp_regions_ns()

    def read(self) -> tuple[int, float]:
        """(regions, seconds in them) since start."""
        regions = self.lib.omp_regions_count() - self.regions
        return regions, (self.lib.omp_regions_ns() - self.ns) / 1e9

    def empty_region_s(self, threads: int, count: int = 20000) -> float:
        """Seconds a region that does nothing takes on `threads` threads: fork and join."""
        self.lib.omp_regions_empty(1000, threads)  # wake the pool first
        return self.lib.omp_regions_empty(count, threads) / 1e9
