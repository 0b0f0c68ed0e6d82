"""Shared fixtures: the real and the tiny model, in-process apps, and real server processes."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from common.config import ServerConfig
from common.model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = sorted(
    (p.name for p in ROOT.glob("step*_*") if (p / "server.py").exists()),
    key=lambda name: int(name[4 : name.index("_")]),
)


def real_model_path() -> Path:
    path = ServerConfig().model_path
    if not (path / "model.safetensors").exists():
        pytest.exit(f"no converted model at {path}: run `python -m common.model fetch`", 2)
    return path


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return real_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", real_model_dir)


@pytest.fixture(scope="session")
def tokenizer(real_model_dir):
    from common.model import load_tokenizer

    return load_tokenizer(real_model_dir)


def step_module(step: str, name: str = "server"):
    return importlib.import_module(f"{step}.{name}")


def tiny_client(step: str, model_dir: Path, **overrides) -> TestClient:
    """A step's app on the tiny model, in-process; use as a context manager (runs lifespan)."""
    server = step_module(step)
    config_class = getattr(server, "Config", ServerConfig)
    config = config_class(model=str(model_dir), **overrides)
    return TestClient(server.build_app(config), raise_server_exceptions=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A step's server as a real process on a free port, its log captured to a file."""

    def __init__(self, step: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.step, self.log_path = step, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **(env or {}), "GATEWAY_PORT": str(self.port)}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", step],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(timeout=120)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.step} exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{self.step} not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    servers: list[ServerProcess] = []

    def start(step: str, **env: str) -> ServerProcess:
        server = ServerProcess(step, tmp_path / f"{step}-{len(servers)}.log", env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def kernels():
    """Step 7's C++ kernels; where they cannot load the test is skipped, except in CI
    (GATEWAY_REQUIRE_KERNELS=1), where it fails."""
    from step7_real_kv.speed import cpu_kernels

    try:
        return cpu_kernels.load(required=True)
    except RuntimeError as exc:
        if os.environ.get("GATEWAY_REQUIRE_KERNELS") == "1":
            pytest.fail(f"GATEWAY_REQUIRE_KERNELS=1, but {exc}")
        pytest.skip(f"no C++ kernels here, step 7 runs its torch code: {exc}")


def require_binary(name: str) -> str:
    """A service binary the tests need; CI (GATEWAY_REQUIRE_SERVICES=1) must have it."""
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install {name})"
        if os.environ.get("GATEWAY_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    def __init__(self, tmp_path: Path) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = [
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--dir",
            str(self.tmp_path),
        ]
        self.proc = subprocess.Popen([self.binary, *args], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.kill()
