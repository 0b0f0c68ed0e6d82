"""Local engines for the two pools on one machine: step 10's engine_server processes on free
ports, started and stopped with the router, configured as step 9's replicas are (its
GATEWAY_* settings for the engines), plus each one's engine id and the transfer's lease and
failure policy, the way blocks move between them (`kv_transport`: shared memory, as both are on
this machine). A decode engine gets a small prompt budget beside its decoding streams
(`decode_prefill_chunk`: the short prompts it prefills itself, proxy.py, come a few tokens at
a time, so they cannot hold its streams up for long) and its own draft length
(`decode_speculative_tokens`); a prefill engine runs at a lower priority (`prefill_nice`), so
the streams' iterations get the cores first. Every engine gets an equal share of the cores
(one thread each on two), and goes when the router goes, even when it is killed."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from common.config import ENV_PREFIX
from step9_router.replicas import LocalReplicas, engine_env, free_port
from step9_router.upstreams import UpstreamPool

log = logging.getLogger("gateway.upstreams")

ENGINE = "step10_disaggregated.engine_server"


class LocalEngines(LocalReplicas):
    def __init__(self, config: Any) -> None:
        count = (0 if config.prefill_upstreams else config.prefill_replicas) + (
            0 if config.decode_upstreams else config.decode_replicas
        )
        super().__init__(config, count)

    def start(self, role: str = "prefill") -> list[str]:
        """Start this role's local engines; their URLs."""
        urls = []
        for i in range(getattr(self.config, f"{role}_replicas")):
            port = free_port()
            env = engine_env(self.config, port, self.count)
            env[f"{ENV_PREFIX}ENGINE_ID"] = f"{role}-{i}"
            env[f"{ENV_PREFIX}KV_LEASE_S"] = str(self.config.kv_lease_s)
            env[f"{ENV_PREFIX}KV_TRANSFER_FAILURE"] = self.config.kv_transfer_failure
            env[f"{ENV_PREFIX}KV_TRANSPORT"] = self.transport()
            if role == "decode":
                drafts = str(self.config.decode_speculative_tokens)
                env[f"{ENV_PREFIX}NUM_SPECULATIVE_TOKENS"] = drafts
                if self.config.decode_prefill_chunk:
                    chunk = str(self.config.decode_prefill_chunk)
                    env[f"{ENV_PREFIX}PREFILL_CHUNK_WHILE_DECODING"] = chunk
            nice = self.config.prefill_nice if role == "prefill" else 0
            argv = [sys.executable, "-m", ENGINE]
            self.processes.append(
                subprocess.Popen(argv, env=env, preexec_fn=functools.partial(_start_child, nice))
            )
            urls.append(f"http://127.0.0.1:{port}")
            log.info("started %s engine %s on port %d", role, ENGINE, port)
        self.urls += urls
        return urls

    def transport(self) -> str:
        """The configured way to move blocks when both pools are local (on this machine);
        http when either is given by URL (it may be on another machine)."""
        if self.config.prefill_upstreams or self.config.decode_upstreams:
            return "http"
        return self.config.kv_transport

    async def wait_ready(  # type: ignore[override]
        self, pools: list[UpstreamPool], client: httpx.AsyncClient, timeout_s: float
    ) -> None:
        """Poll until every pool's engines are ready; fail if one exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while sum(len(p.ready()) for p in pools) < sum(len(p.upstreams) for p in pools):
            if self.exited():
                raise RuntimeError(f"a local engine exited during startup: {self.exited()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engines not ready after {timeout_s:g} s")
            await asyncio.gather(*(p.poll_once(client) for p in pools))
            await asyncio.sleep(0.25)


def _start_child(nice: int) -> None:
    """In the engine's process, before it runs: the kernel sends it SIGTERM when the router
    exits, however it exits (killed during start-up too, before it could stop its engines), so
    no engine outlives its router. Linux only (prctl); elsewhere the router's own stop does.
    Then its niceness: a prefill engine's forward passes yield the cores to the decode
    engine's."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if nice:
        os.nice(nice)
