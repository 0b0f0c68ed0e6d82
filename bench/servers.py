"""The servers under test: each step as its own fresh process, or an external --target URL.
(bench/peers.py starts the reference servers as the same kind of process.)

Both kinds answer the same small interface (url, alive, rss_bytes, stop), so the runner does
not care which one it is measuring.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
_STEP_NAME = re.compile(r"^step(\d+)_\w+$")


def discover_steps(root: Path = ROOT) -> list[str]:
    """Every `stepN_name/` folder with a server.py, in step order."""
    found = [p.name for p in root.iterdir() if _STEP_NAME.match(p.name) and _has_server(p)]
    return sorted(found, key=step_number)


def _has_server(folder: Path) -> bool:
    return (folder / "server.py").is_file()


def step_number(name: str) -> int:
    match = _STEP_NAME.match(name)
    if match is None:
        raise ValueError(f"not a step folder name: {name!r}")
    return int(match.group(1))


def select_steps(available: list[str], wanted: str | None) -> list[str]:
    """`--steps 1,3` or `--steps step1_central_loader`; None means all. Unknown ones fail."""
    if not wanted:
        return list(available)
    chosen: list[str] = []
    for token in (t.strip() for t in wanted.split(",") if t.strip()):
        matches = [s for s in available if token in (s, str(step_number(s)))]
        if not matches:
            raise SystemExit(f"no step matches {token!r}; found: {', '.join(available)}")
        chosen.extend(m for m in matches if m not in chosen)
    return sorted(chosen, key=step_number)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotReady(RuntimeError):
    pass


def wait_ready(url: str, timeout_s: float, alive=lambda: True) -> float:
    """Poll GET /health until it answers 200; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if not alive():
            raise NotReady("the server process exited during startup")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise NotReady(f"/health not ready after {timeout_s:.0f} s")


class ProcessServer:
    """A server command run in a new process group on a local port, its log in a file.

    `step` is the row name it is reported under; `model` is the name requests must send, or None
    to ask the server's GET /v1/models.
    """

    def __init__(
        self,
        step: str,
        argv: list[str],
        log_path: Path,
        port: int,
        dtype: str,
        env: dict[str, str] | None = None,
        model: str | None = None,
    ) -> None:
        self.step, self.dtype, self.log_path, self.model = step, dtype, log_path, model
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that stop() can reach any children it spawned
        )
        self._ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout_s: float) -> float:
        return wait_ready(self.url, timeout_s, self.alive)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exited(self) -> bool:
        """Cheap enough to poll many times a second while load runs."""
        return not self.alive()

    @property
    def exit_code(self) -> int | None:
        return self.proc.poll()

    def rss_bytes(self) -> int | None:
        """Resident memory of the server and its children, now."""
        try:
            procs = [self._ps, *self._ps.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:  # it exited between the check and the read
            return None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server and its children have used so far."""
        try:
            procs = [self._ps, *self._ps.children(recursive=True)]
            return sum(sum(p.cpu_times()[:2]) for p in procs)
        except psutil.Error:
            return 0.0

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


class StepServer(ProcessServer):
    """`python -m <step> --port P --dtype D`."""

    def __init__(self, step: str, dtype: str, log_path: Path) -> None:
        port = free_port()
        flags = ["--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
        argv = [sys.executable, "-m", step, *flags, "--log-level", "warning"]
        super().__init__(step, argv, log_path, port, dtype)


class TargetServer:
    """An OpenAI-compatible server started by someone else: no process to watch or sample."""

    def __init__(self, url: str) -> None:
        self.step = url
        self.dtype = "unknown"
        self.model: str | None = None  # ask its GET /v1/models
        self.url = url.rstrip("/")
        self.exit_code = None

    def wait_ready(self, timeout_s: float) -> float:
        return wait_ready(self.url, timeout_s)

    def exited(self) -> bool:
        return False  # not ours to watch; the runner asks alive() after each level

    def alive(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def rss_bytes(self) -> int | None:
        return None

    def cpu_seconds(self) -> float:
        return 0.0  # not ours to see: a target on this machine shows up as foreign CPU

    def log_tail(self, lines: int = 30) -> str:
        return ""

    def stop(self, grace_s: float = 10.0) -> None:
        pass
