"""Builds and loads cpu_kernels.cpp, a torch C++ extension, once per machine.

torch.utils.cpp_extension compiles it with the machine's C++ compiler: about a minute the first
time, then it loads from ~/.cache/torch_extensions in well under a second (set
TORCH_EXTENSIONS_DIR to move it). `python -m step7_real_kv.cpu_kernels` builds it ahead
of time (`./run.sh setup` does). Where it cannot be built, step 7 runs its torch code instead
and says so in its log.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger("gateway")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -march=native: AVX2 and FMA where the CPU has them (the build cache is per machine).
# -ffast-math: lets GCC vectorize expf (glibc's vector variants) and the sums; every input is
# finite by construction (no padding is ever read), which is what it assumes.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module, or None when it cannot be built here."""
    from torch.utils.cpp_extension import load as build

    started = time.monotonic()
    try:
        module = build(
            name="gateway_step7_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no headers: the torch path still works
        log.warning("step 7 CPU kernels unavailable (%s); using the torch code", exc)
        return None
    log.info("step 7 CPU kernels ready in %.1f s", time.monotonic() - started)
    return module


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    print("[kernels] building step 7's CPU kernels (once, about a minute)", flush=True)
    raise SystemExit(0 if load() is not None else 1)
