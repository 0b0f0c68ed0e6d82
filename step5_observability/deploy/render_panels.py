"""Draw the Grafana dashboard's panels from a real run, without Grafana.

    python -m step5_observability.deploy.render_panels [--seconds 120] [--out panels.png]

Starts a step-5 server and Prometheus (deploy/prometheus.yml, target swapped for the local
server), sends a mixed chat load on loopback for a bounded time, then runs every panel's PromQL
over the run with Prometheus' range API and plots the answers, one subplot per panel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from bench.servers import free_port

DEPLOY = Path(__file__).resolve().parent
SYSTEM = "You are a concise assistant. Answer in one or two short sentences. " * 4
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is 2 + 2?",
    "Why is the sky blue?",
    "Name a planet.",
    "What is water made of?",
]


def wait_http(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def send_load(url: str, stop: threading.Event, worker: int) -> None:
    i = worker
    while not stop.is_set():
        question = QUESTIONS[i % len(QUESTIONS)]
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        body = {
            "model": "SmolLM2-135M-Instruct",
            "messages": messages,
            "max_tokens": 24,
            "temperature": 0 if i % 3 else 0.8,
        }
        if i % 7 == 0:
            body["temperature"] = 5  # a client error, for the outcome panel
        # A slow answer is the server's problem to show, not the load's.
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        i += 1


def query_range(prom: str, expr: str, start: float, end: float) -> list[dict]:
    params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": 5}
    return httpx.get(prom + "/api/v1/query_range", params=params, timeout=30).json()["data"][
        "result"
    ]


def plot(panels: list[dict], results: list[list], start: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3 * rows), squeeze=False)
    for ax, panel, series_sets in zip(axes.flat, panels, results, strict=False):
        for target, series in zip(panel["targets"], series_sets, strict=True):
            for s in series:
                xs = [float(t) - start for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                label = target["legendFormat"].replace(
                    "{{outcome}}", s["metric"].get("outcome", "")
                )
                ax.plot(xs, ys, label=label)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("s into the run", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--out", type=Path, default=DEPLOY / "panels.png")
    args = parser.parse_args(argv)
    port, prom_port = free_port(), free_port()
    url, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
        (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(config))
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "step5_observability",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
        )
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp}/prometheus.yml",
                f"--storage.tsdb.path={tmp}/db",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(url + "/health")
            wait_http(prom + "/-/ready")
            start = time.time()
            stop = threading.Event()
            users = [
                threading.Thread(target=send_load, args=(url, stop, i)) for i in range(args.users)
            ]
            for u in users:
                u.start()
            while time.time() - start < args.seconds:
                print(f"[panels] load {time.time() - start:.0f}/{args.seconds:.0f} s", flush=True)
                time.sleep(10)
            stop.set()
            for u in users:
                u.join()
            time.sleep(6)  # one more scrape
            panels = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())["panels"]
            end = time.time()
            results = [
                [query_range(prom, t["expr"], start, end) for t in p["targets"]] for p in panels
            ]
            plot(panels, results, start, args.out)
            print(f"[panels] wrote {args.out}")
        finally:
            server.terminate()
            prometheus.terminate()
            server.wait()
            prometheus.wait()


if __name__ == "__main__":
    main()
