"""Step 5: metrics move as they should, a real Prometheus scrapes a real server and every
dashboard expression returns data, log lines are JSON with the documented fields."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port, require_binary, tiny_client

DEPLOY = ROOT / "step5_observability" / "deploy"
CHAT = "/v1/chat/completions"
MODEL = "SmolLM2-135M-Instruct"


def chat(content: str, **fields) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return {**body, **fields}


def samples(text: str) -> dict[tuple, float]:
    """{(name, sorted label items): value} for every sample of a /metrics page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: dict, name: str, **labels) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_as_they_should(tiny_model_dir):
    with tiny_client("step5_observability", tiny_model_dir, response_cache=False) as client:
        before = samples(client.get("/metrics").text)
        usages = []
        for i in range(2):
            usages.append(client.post(CHAT, json=chat(f"question {i}", temperature=0)).json())
        body = chat("streamed", temperature=0, stream=True)
        with client.stream("POST", CHAT, json=body) as response:
            assert response.status_code == 200
            list(response.iter_lines())
        assert client.post(CHAT, json=chat("bad", temperature=9)).status_code == 400
        assert client.post(CHAT, json=chat("bad", model="nope")).status_code == 400
        after = samples(client.get("/metrics").text)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    success = dict(outcome="success", finish_reason="length")
    assert delta("gateway_requests_total", **success) == 3
    assert delta("gateway_requests_total", outcome="client_error", finish_reason="none") == 2
    prompt = sum(u["usage"]["prompt_tokens"] for u in usages)
    assert delta("gateway_prompt_tokens_total") > prompt  # plus the streamed request's
    assert delta("gateway_generation_tokens_total") == 3 * 4
    assert delta("gateway_time_to_first_token_seconds_count") == 3
    assert delta("gateway_e2e_request_latency_seconds_count") == 3
    assert delta("gateway_queue_wait_seconds_count") == 3
    assert delta("gateway_inter_token_latency_seconds_count") == 3 * 3
    assert delta("gateway_time_per_output_token_seconds_count") == 3
    # Three batches of one row: a prefill and three decode passes each.
    assert delta("gateway_batch_size_count") == 3 * 4
    assert delta("gateway_batch_size_sum") == 3 * 4
    assert value(after, "gateway_prefix_cache_queried_tokens_total") >= prompt
    assert value(after, "gateway_model_load_seconds") > 0


def test_cancelled_and_rejected_requests_are_counted(start_server, tiny_model_dir):
    server = start_server(
        "step5_observability",
        GATEWAY_MODEL=str(tiny_model_dir),
        GATEWAY_MAX_QUEUE_SIZE="1",
        GATEWAY_MAX_BATCH_SIZE="1",
    )
    long = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 1500,
        "stream": True,
        "seed": 1,
        "temperature": 1.0,
    }
    url = server.url + "/v1/completions"
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url, json=long) as running:
            lines = running.iter_lines()  # keep a reference: a dropped iterator closes the stream
            next(lines)  # in the batch: the queue is empty again
            with http.stream("POST", url, json=long) as queued:
                assert queued.status_code == 200
                rejected = http.post(url, json={**long, "stream": False})
        assert rejected.status_code == 429, server.log()
        deadline = time.monotonic() + 30
        while True:
            page = samples(http.get(server.url + "/metrics").text)
            cancelled = value(
                page, "gateway_requests_total", outcome="cancelled", finish_reason="none"
            )
            if cancelled == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert cancelled == 2  # the one generating and the one still queued
    assert value(page, "gateway_requests_total", outcome="rejected", finish_reason="none") == 1
    assert value(page, "gateway_requests_running") == 0
    assert value(page, "gateway_requests_waiting") == 0


def test_json_logs_have_the_documented_fields_and_request_ids(start_server, tiny_model_dir):
    server = start_server(
        "step5_observability",
        GATEWAY_MODEL=str(tiny_model_dir),
        GATEWAY_LOG_FORMAT="json",
        GATEWAY_STATS_INTERVAL_S="0.5",
    )
    secret = "a prompt that must not be logged"
    given = httpx.post(server.url + CHAT, json=chat(secret), headers={"X-Request-Id": "abc-123"})
    made = httpx.post(server.url + CHAT, json=chat("no id"))
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32
    time.sleep(1.5)  # at least one stats line
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    requests = {r["request_id"]: r for r in lines if r["logger"] == "gateway.requests"}
    entry = requests["abc-123"]
    for key in (
        "outcome",
        "completion_id",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "cached_prompt_tokens",
        "queue_wait_s",
        "ttft_s",
        "tpot_s",
        "e2e_s",
        "ts",
    ):
        assert key in entry, key
    assert entry["outcome"] == "success" and entry["output_tokens"] == 4
    assert made.headers["x-request-id"] in requests
    assert secret not in server.log()
    stats = [r for r in lines if r["logger"] == "gateway.stats"]
    assert stats and {"tokens_per_s", "running", "waiting", "prefix_cache_hit_rate"} <= set(
        stats[-1]
    )


def test_compose_file_parses_and_mounts_the_tested_prometheus_config():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"gateway", "redis", "prometheus", "grafana"}
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./prometheus.yml:") for m in mounts)
    assert (DEPLOY / compose["services"]["gateway"]["build"]["dockerfile"].split("/")[-1]).exists()


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus with deploy/prometheus.yml, its target swapped for the test server."""
    binary = require_binary("prometheus")
    procs = []

    def start(target: str) -> str:
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "prometheus.log", "w"),
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=20)


def traffic(url: str, stop: threading.Event) -> None:
    """A mix that moves every panel: repeats (cache hits), a shared prefix, bad requests."""
    system = {"role": "system", "content": "You answer in one short sentence. " * 6}
    i = 0
    while not stop.is_set():
        body = chat(f"question {i % 3}", temperature=0)
        body["messages"] = [system, *body["messages"]]
        httpx.post(url + CHAT, json=body, timeout=60)
        httpx.post(url + CHAT, json=chat("bad", temperature=-1), timeout=60)
        i += 1


def test_prometheus_scrapes_and_every_dashboard_expression_returns_data(
    start_server, tiny_model_dir, prometheus
):
    server = start_server("step5_observability", GATEWAY_MODEL=str(tiny_model_dir))
    prom = prometheus(server.url.removeprefix("http://"))
    stop = threading.Event()
    load = threading.Thread(target=traffic, args=(server.url, stop))
    load.start()
    try:
        missing = wait_for_data(prom, dashboard_exprs(), timeout=90)
    finally:
        stop.set()
        load.join()
    assert missing == []


def wait_for_data(prom: str, exprs: list[str], timeout: float) -> list[str]:
    """Query until every expression returns a non-empty result; return those that never did."""
    deadline = time.monotonic() + timeout
    pending = list(exprs)
    while pending and time.monotonic() < deadline:
        time.sleep(2)
        pending = [e for e in pending if not _has_data(prom, e)]
    return pending


def _has_data(prom: str, expr: str) -> bool:
    try:
        reply = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=5).json()
    except httpx.HTTPError:
        return False
    assert reply["status"] == "success", (expr, reply)
    return len(reply["data"]["result"]) > 0


def test_dashboard_expressions_use_only_exported_metrics(tiny_model_dir):
    with tiny_client("step5_observability", tiny_model_dir) as client:
        client.post(CHAT, json=chat("x", temperature=0))
        page = client.get("/metrics").text
    exported = {name for name, _ in samples(page)}
    for expr in dashboard_exprs():
        for word in expr.replace("(", " ").replace(")", " ").replace("[", " ").split():
            name = word.split("{")[0]
            if name.startswith("gateway_"):
                assert name in exported, (name, expr)
