"""Builds cpu_kernels.cpp, a torch C++ extension, once, ahead of time; loads it without building.

`python -m step7_real_kv.speed.cpu_kernels` compiles it (half a minute to a minute; `./run.sh
setup` and the Docker image do it) into a folder of the gateway's cache named by a hash of
everything the binary depends on: the .cpp's bytes, the compile flags, torch's version and
install path, and the Python build. `load()` then imports that .so directly, in well under a
second, and never runs the compiler or ninja again: not for another command line or working
directory, nor for another clone of the same source on the same torch. Changing the source, the
flags, torch or Python names a new folder, so a stale binary is never loaded.

    <GATEWAY_CACHE_DIR, default ~/.cache/llm-gateway>/kernels/<key>/cpu_kernels_<key>.so

The target CPU comes from GATEWAY_KERNELS_MARCH, passed to the compiler as -march (default
"native": AVX2 and FMA where the building CPU has them). A -march=native build runs only on
CPUs like the one that built it (elsewhere it can die of an illegal instruction), so an image
that runs on other machines is built with a portable target, x86-64-v3 (any AVX2 CPU).

Where no build is found, `load()` builds one once and says so. Where it cannot be built (no
C++ compiler, no ninja), `load()` returns None and step 7 runs its torch code, with a warning;
`load(required=True)` raises instead, for a server that was told to run these kernels.
`./run.sh setup` falls back the same way, unless GATEWAY_REQUIRE_KERNELS=1 (CI), where a failed
build fails the setup, and the kernel tests fail instead of skipping.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

from common.config import ENV_PREFIX, default_cache_dir

log = logging.getLogger("gateway")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
MARCH_ENV = f"{ENV_PREFIX}KERNELS_MARCH"
DEFAULT_MARCH = "native"
HOW_TO_FIX = (
    f"install a C++ compiler (g++) and ninja (and check {ENV_PREFIX}KERNELS_MARCH, if set), "
    "then build the kernels ahead of time with `python -m step7_real_kv.speed.cpu_kernels` "
    "(./run.sh setup does)"
)


def march() -> str:
    """The -march the kernels are built for: GATEWAY_KERNELS_MARCH, default native."""
    value = os.environ.get(MARCH_ENV, DEFAULT_MARCH)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value):  # it ends up in a shell command line
        raise ValueError(f"{MARCH_ENV}={value!r} is not a -march value (e.g. native, x86-64-v3)")
    return value


def compile_flags(target: str) -> list[str]:
    # -ffast-math: lets GCC vectorize expf (glibc's vector variants) and the sums; every input
    # is finite by construction (no padding is ever read), which is what it assumes.
    return ["-O3", f"-march={target}", "-fopenmp", "-ffast-math"]


LINK_FLAGS = ("-fopenmp",)


def build_key(target: str | None = None) -> str:
    """A hash of everything the binary depends on; names its folder and its module."""
    import torch

    parts = {
        "source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "cflags": compile_flags(target or march()),
        "ldflags": list(LINK_FLAGS),
        "torch": torch.__version__,
        "torch_path": str(Path(torch.__file__).resolve().parent),
        "python": sys.version,
        "abi": sysconfig.get_config_var("EXT_SUFFIX"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_dir(target: str | None = None) -> Path:
    return default_cache_dir() / "kernels" / build_key(target)


def module_name(target: str | None = None) -> str:
    return f"cpu_kernels_{build_key(target)}"


def library_path(target: str | None = None) -> Path:
    """Where the built module is, once it is built."""
    return build_dir(target) / f"{module_name(target)}.so"


def build(target: str | None = None) -> ModuleType:
    """Compiles the kernels into build_dir() (with torch's cpp_extension, so ninja and a C++
    compiler) and returns the module; raises when the build fails. The .so is moved into place
    only once it is whole, so a concurrent load() never finds half of one."""
    from torch.utils.cpp_extension import load as compile_and_import

    target = target or march()
    work = build_dir(target) / "build"
    work.mkdir(parents=True, exist_ok=True)
    module = compile_and_import(
        name=module_name(target),
        sources=[str(SOURCE)],
        extra_cflags=compile_flags(target),
        extra_ldflags=list(LINK_FLAGS),  # a copy: cpp_extension appends to it
        build_directory=str(work),
    )
    final = library_path(target)
    partial = final.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(str(module.__file__), partial)
    os.replace(partial, final)
    return module


def import_built(path: Path, name: str) -> ModuleType:
    """Imports an already built module from its .so: no compiler, no ninja."""
    import torch  # noqa: F401  (the .so links against libtorch, which torch loads)

    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@functools.cache
def _find_or_build() -> ModuleType | str:
    """The module, or why there is none; tried once per process."""
    try:
        path = library_path()
        if path.exists():
            return import_built(path, module_name())
        started = time.monotonic()
        log.warning("step 7 CPU kernels: no ahead-of-time build at %s; building it now", path)
        module = build()
        log.info("step 7 CPU kernels built in %.1f s", time.monotonic() - started)
        return module
    except Exception as exc:  # no compiler, no ninja, no headers, a bad -march
        return f"{type(exc).__name__}: {exc}"


@functools.cache
def load(required: bool = False) -> ModuleType | None:
    """The compiled kernels. When they cannot be had: None (the caller runs its torch code),
    with a warning, or, when `required`, a RuntimeError that says what failed and how to fix it."""
    found = _find_or_build()
    if isinstance(found, ModuleType):
        return found
    if required:
        why = f"step 7's C++ kernels are required but could not be loaded or built: {found}"
        raise RuntimeError(f"{why}\nTo fix: {HOW_TO_FIX}.")
    log.warning("step 7 CPU kernels unavailable (%s); using the torch code", found)
    return None


def main() -> int:
    """Builds the kernels ahead of time, or finds the existing build: 0 on success, 1 not."""
    logging.basicConfig(level="INFO")
    started = time.monotonic()
    try:
        path = library_path()
        if path.exists():
            import_built(path, module_name())
            done = f"found an existing build; loaded it in {time.monotonic() - started:.2f} s"
        else:
            print(
                f"[kernels] no build for -march={march()} yet: building (under a minute)",
                flush=True,
            )
            build()
            done = f"built in {time.monotonic() - started:.1f} s"
    except Exception as exc:
        print(f"[kernels] step 7's C++ kernels failed to build or load: {exc}", file=sys.stderr)
        print(f"[kernels] to fix: {HOW_TO_FIX}", file=sys.stderr)
        return 1
    print(f"[kernels] step 7's CPU kernels: {done} ({path})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
