"""Local engines for one machine: N step 8 processes on free ports, started and stopped with the
router. (Beyond one machine, Kubernetes places and restarts the engines instead: deploy/.)

Each replica is `python -m step8_speculative` with the router's environment and the router's own
settings for the engine (model, dtype, admission limits, log format, ...) as GATEWAY_* variables,
so `GATEWAY_NUM_KV_BLOCKS=512 python -m step9_router --dtype bfloat16` configures both. The
response cache stays off in the replicas: the router keeps one in front of all of them. Their
output goes to the router's own stdout and stderr, one log for the whole server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from common.config import ENV_PREFIX, ServerConfig
from step5_observability.structured_logs import LogConfig
from step6_backpressure.admission import AdmissionConfig
from step6_backpressure.lifecycle import LifecycleConfig
from step9_router.upstreams import UpstreamPool

log = logging.getLogger("gateway.upstreams")

ENGINE = "step8_speculative"
# The parts of the router's config that configure its engines too, except what is the router's:
# its address, and its API key (the engines listen on 127.0.0.1 only).
ENGINE_PARTS = (ServerConfig, AdmissionConfig, LifecycleConfig, LogConfig)
ROUTER_ONLY = {"host", "port", "api_key"}


def engine_env(config: Any, port: int, count: int = 1) -> dict[str, str]:
    """The environment of one of `count` local engines: the router's, plus its engine settings.
    Unless OMP_NUM_THREADS says otherwise, the engines share the cores evenly: torch's default
    (a thread per core in every engine) would put `count` threads on each core, and its
    threads spin while they wait for one another."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    for part in ENGINE_PARTS:
        for f in dataclasses.fields(part):
            if f.name not in ROUTER_ONLY:
                env[ENV_PREFIX + f.name.upper()] = _text(getattr(config, f.name))
    env.update(
        {
            f"{ENV_PREFIX}HOST": "127.0.0.1",
            f"{ENV_PREFIX}PORT": str(port),
            f"{ENV_PREFIX}RESPONSE_CACHE": "false",
        }
    )
    return env


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalReplicas:
    """The engine processes; `urls` lists them once `start` has launched them."""

    def __init__(self, config: Any, count: int) -> None:
        self.config, self.count = config, count
        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []

    def start(self) -> list[str]:
        for _ in range(self.count):
            port = free_port()
            argv = [sys.executable, "-m", ENGINE]
            env = engine_env(self.config, port, self.count)
            self.processes.append(subprocess.Popen(argv, env=env))
            self.urls.append(f"http://127.0.0.1:{port}")
            log.info("started %s on port %d (pid %d)", ENGINE, port, self.processes[-1].pid)
        return self.urls

    async def wait_ready(
        self, pool: UpstreamPool, client: httpx.AsyncClient, timeout_s: float
    ) -> None:
        """Poll until every engine is ready; fail if one exits or time runs out first."""
        deadline = time.monotonic() + timeout_s
        while len(pool.ready()) < len(self.urls):
            if self.exited():
                raise RuntimeError(f"a local engine exited during startup: {self.exited()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"local engines not ready after {timeout_s:g} s")
            await pool.poll_once(client)
            await asyncio.sleep(0.25)

    def exited(self) -> list[int]:
        """Exit codes of the engines that are no longer running."""
        return [code for p in self.processes if (code := p.poll()) is not None]

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (each engine drains what it still runs), then SIGKILL after `grace_s`."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
