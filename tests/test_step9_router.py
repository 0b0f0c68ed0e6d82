"""Step 9 through HTTP: a router process in front of two real step 7 replicas on the tiny model.

Greedy answers through the router equal one step 7's; a bad request never reaches a replica;
the answer cache sits in front, and two routers share it through Redis; a client that hangs up
mid-stream leaves nothing running on the replica; a 429 from one replica is served by the
other, and when every replica refuses the client gets one 429 with Retry-After; a replica
killed mid-run fails only what it was running (a stream with an in-band error event, a whole
answer with a 502), and no request sent after it is killed fails. The embedded mode (the
router starting its own replicas) runs in the cross-step tests: tests/test_contract.py (real
model) and tests/test_cancellation.py.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
NO_CACHE = {"Cache-Control": "no-cache"}
# Replica A refuses (429, queue_tokens) a prompt of more than 150 tokens, B one of more than 300.
LIMITS = (150, 300)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def replica(path, model_dir, max_waiting_tokens: int, **env: str) -> ServerProcess:
    return ServerProcess(
        "step7_real_kv",
        path,
        {
            "GATEWAY_MODEL": str(model_dir),
            "GATEWAY_RESPONSE_CACHE": "false",
            "GATEWAY_MAX_WAITING_TOKENS": str(max_waiting_tokens),
            **env,
        },
    )


def router_for(path, upstreams: list[ServerProcess], **env: str) -> ServerProcess:
    router = ServerProcess(
        "step9_router",
        path,
        {
            "GATEWAY_UPSTREAMS": ",".join(u.url for u in upstreams),
            "GATEWAY_HEALTH_INTERVAL_S": "0.2",
            **env,
        },
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # /health says ready at the first ready replica
        states = httpx.get(router.url + "/health", timeout=5).json()["upstreams"].values()
        if all(state["ready"] for state in states):
            return router
        time.sleep(0.1)
    raise TimeoutError(router.log())


def name(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_model_dir):
    logs = tmp_path_factory.mktemp("step9-replicas")
    started: list[ServerProcess] = []
    try:
        for label, limit in zip("ab", LIMITS, strict=True):
            started.append(replica(logs / f"{label}.log", tiny_model_dir, limit))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def router(replicas, tmp_path_factory):
    server = router_for(tmp_path_factory.mktemp("step9-router") / "router.log", replicas)
    yield server
    server.stop()


def completion(prompt, max_tokens: int = 12, **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **fields}


def chat(text: str, **fields) -> dict:
    messages = [{"role": "user", "content": text}]
    return {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, **fields}


def streamed_text(lines: Iterator[str]) -> tuple[str, list[str]]:
    """The text of a chat or completion stream (its remaining lines), and its data lines."""
    lines = [line for line in lines if line.startswith("data: ")]
    text = ""
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: ") :])
        for choice in chunk.get("choices", []):
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text, lines


# ---------------------------------------------------------------- one fleet, many requests


def test_greedy_answers_through_the_router_equal_one_step7(router, replicas):
    direct, names = replicas[0].url, {name(r) for r in replicas}
    served_by = set()
    for text in ("Hello there", "The sea is", "Name three colors", "One, two,"):
        body = chat(text)
        expected = httpx.post(direct + "/v1/chat/completions", json=body, timeout=60).json()
        got = httpx.post(
            router.url + "/v1/chat/completions", json=body, headers=NO_CACHE, timeout=60
        )
        assert got.status_code == 200 and got.headers["x-upstream"] in names
        served_by.add(got.headers["x-upstream"])
        answer = expected["choices"][0]["message"]["content"]
        assert got.json()["choices"][0]["message"]["content"] == answer
        counts = ("prompt_tokens", "completion_tokens")  # (cached tokens depend on the replica)
        assert [got.json()["usage"][k] for k in counts] == [expected["usage"][k] for k in counts]
        with httpx.stream(
            "POST", router.url + "/v1/chat/completions", json={**body, "stream": True}
        ) as response:
            assert response.headers["x-upstream"] in names
            streamed, lines = streamed_text(response.iter_lines())
        assert streamed == answer and lines[-1] == "data: [DONE]"
    whole = httpx.post(direct + "/v1/completions", json=completion("Once upon"), timeout=60)
    via = httpx.post(router.url + "/v1/completions", json=completion("Once upon"), timeout=60)
    assert via.json()["choices"][0]["text"] == whole.json()["choices"][0]["text"]
    assert served_by  # (which replica depends on the policy's draws; any must answer the same)


def test_a_bad_request_gets_the_routers_400_and_never_reaches_a_replica(router, replicas):
    before = sum(metric(r.url, "gateway_requests_total") for r in replicas)
    bad = httpx.post(router.url + "/v1/chat/completions", content=b"{oops", timeout=10)
    two = httpx.post(router.url + "/v1/chat/completions", json=chat("hi", n=9), timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert two.status_code == 400 and two.json()["error"]["param"] == "n"
    assert "x-upstream" not in bad.headers
    assert sum(metric(r.url, "gateway_requests_total") for r in replicas) == before


def test_the_router_answers_a_repeated_greedy_request_from_its_cache(router, replicas):
    body = completion("A repeated question", max_tokens=6)
    first = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
    before = sum(metric(r.url, "gateway_requests_total") for r in replicas)
    again = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
    assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    assert again.json()["choices"] == first.json()["choices"]
    assert again.json()["id"] != first.json()["id"]
    assert sum(metric(r.url, "gateway_requests_total") for r in replicas) == before
    assert metric(router.url, "gateway_response_cache_hits_total") >= 1


def test_the_routers_own_metrics_count_its_requests(replicas, tmp_path):
    """Step 5's metrics at the router: one outcome per request, TTFT and e2e observed, however
    the request ended (a replica's answer, a stream, the cache, or the router's own 400)."""
    router = router_for(tmp_path / "router.log", replicas)
    try:
        url = router.url + "/v1/completions"
        body = completion("Counted at the router", max_tokens=6)
        assert httpx.post(url, json=body, timeout=60).status_code == 200  # relayed whole
        assert httpx.post(url, json=body, timeout=60).headers["x-cache"] == "hit"
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as stream:
            assert stream.status_code == 200
            streamed_text(stream.iter_lines())
        assert httpx.post(url, content=b"{oops", timeout=10).status_code == 400
        assert metric(router.url, "gateway_requests_total", outcome="success") == 3
        assert metric(router.url, "gateway_requests_total", outcome="client_error") == 1
        assert metric(router.url, "gateway_time_to_first_token_seconds_count") == 3
        assert metric(router.url, "gateway_e2e_request_latency_seconds_count") == 3
        assert metric(router.url, "gateway_requests_running") == 0
        assert metric(router.url, "gateway_model_load_seconds") > 0  # the fleet's start-up
        log = router.log()
        assert "/health/ready" not in log  # the readiness polls log at debug, not info
    finally:
        router.stop()


def test_the_router_is_ready_only_while_a_replica_is(tmp_path, tiny_model_dir):
    """Ready means it can serve (Kubernetes' readiness probe asks /health/ready): with its only
    replica gone the router would answer every request 503, and its readiness says so."""
    engine = replica(tmp_path / "engine.log", tiny_model_dir, 1000)
    router = router_for(tmp_path / "router.log", [engine])
    try:
        assert httpx.get(router.url + "/health/ready", timeout=5).status_code == 200
        engine.proc.kill()
        engine.proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until a poll (every 0.2 s) finds it gone
            ready = httpx.get(router.url + "/health/ready", timeout=5)
            if ready.status_code != 200:
                break
            time.sleep(0.1)
        assert ready.status_code == 503 and ready.json()["reason"] == "no replica ready"
        assert httpx.get(router.url + "/health/live", timeout=5).status_code == 200
        refused = httpx.post(router.url + "/v1/completions", json=completion("hi"), timeout=10)
        assert refused.status_code == 503
    finally:
        router.stop()
        engine.stop()


def test_two_routers_share_one_answer_cache_in_redis(replicas, redis_server, tmp_path):
    """Step 4's Redis backend in front of the fleet: what router A stored, router B serves."""
    routers = [
        router_for(tmp_path / f"{label}.log", replicas, GATEWAY_REDIS_URL=redis_server.url)
        for label in "ab"
    ]
    try:
        body = completion("Asked of two routers", max_tokens=6)
        first = httpx.post(routers[0].url + "/v1/completions", json=body, timeout=60)
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        assert "x-upstream" in first.headers
        db = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 10
        while not db.keys("gateway:answer:*") and time.monotonic() < deadline:
            time.sleep(0.05)
        before = sum(metric(r.url, "gateway_requests_total") for r in replicas)
        second = httpx.post(routers[1].url + "/v1/completions", json=body, timeout=60)
        assert second.status_code == 200 and second.headers["x-cache"] == "hit"
        assert "x-upstream" not in second.headers  # no replica was asked
        assert second.json()["choices"] == first.json()["choices"]
        assert sum(metric(r.url, "gateway_requests_total") for r in replicas) == before
    finally:
        for router in routers:
            router.stop()


def test_a_disconnected_stream_leaves_no_running_request_on_its_replica(router, replicas):
    body = completion("Once upon a time", max_tokens=1000, stream=True)
    by_name = {name(r): r for r in replicas}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", router.url + "/v1/completions", json=body) as response,
    ):
        upstream = by_name[response.headers["x-upstream"]]
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line)[len("data: ") :])
        next(lines)
        assert metric(upstream.url, "gateway_requests_running") == 1  # still generating
    deadline = time.monotonic() + 15
    while metric(upstream.url, "gateway_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(upstream.url, "gateway_requests_running") == 0
    line = next((x for x in upstream.log().splitlines() if f"request {first['id']} done" in x), "")
    assert "status=cancelled" in line, upstream.log()[-3000:]
    assert int(re.search(r"output_tokens=(\d+)", line).group(1)) < 1000
    assert metric(router.url, "gateway_upstream_outstanding") == 0


def test_a_429_from_one_replica_is_served_by_the_other(replicas, tmp_path):
    a, b = replicas
    turns = router_for(tmp_path / "rr.log", replicas, GATEWAY_POLICY="round_robin")
    try:
        refused_before = metric(a.url, "gateway_admission_events_total")
        middle = completion([1000] * 200, max_tokens=4)  # over A's 150 tokens, under B's 300
        first = httpx.post(turns.url + "/v1/completions", json=middle, headers=NO_CACHE, timeout=60)
        assert first.status_code == 200 and first.headers["x-upstream"] == name(b)
        assert metric(a.url, "gateway_admission_events_total") == refused_before + 1
        retried = {"upstream": name(a), "status": "429"}
        assert metric(turns.url, "gateway_upstream_retries_total", **retried) == 1
        # A rests for its Retry-After: the next request goes straight to B.
        second = httpx.post(
            turns.url + "/v1/completions", json=middle, headers=NO_CACHE, timeout=60
        )
        assert second.headers["x-upstream"] == name(b)
        assert metric(a.url, "gateway_admission_events_total") == refused_before + 1
        # Over both limits: B refuses too, and A is resting: one clean 429 for the client.
        b_before = metric(b.url, "gateway_admission_events_total")
        big = completion([1000] * 400, max_tokens=4)
        refused = httpx.post(turns.url + "/v1/completions", json=big, headers=NO_CACHE, timeout=60)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "upstreams_busy"
        assert int(refused.headers["retry-after"]) >= 1
        assert metric(b.url, "gateway_admission_events_total") == b_before + 1
        reasons = {"reason": "rejected:upstreams_busy"}
        assert metric(turns.url, "gateway_admission_events_total", **reasons) == 1
    finally:
        turns.stop()


def test_the_router_exports_per_replica_series(router, replicas):
    for r in replicas:
        label = {"upstream": name(r)}
        assert metric(router.url, "gateway_upstream_ready", **label) == 1
        assert metric(router.url, "gateway_upstream_outstanding", **label) == 0
    assert metric(router.url, "gateway_upstream_requests_total", outcome="success") >= 8
    assert metric(router.url, "gateway_upstream_requests_total", outcome="cancelled") >= 1
    assert metric(router.url, "gateway_routing_decisions_total") >= 8


# ---------------------------------------------------------------- a replica dies mid-run


class Background:
    """A whole (non-streamed) request in a thread: its response once it is back."""

    def __init__(self, url: str, body: dict) -> None:
        self.response: httpx.Response | None = None
        self.thread = threading.Thread(target=self._run, args=(url, body))
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        self.response = httpx.post(url, json=body, timeout=120)

    def result(self) -> httpx.Response:
        self.thread.join(timeout=120)
        assert self.response is not None
        return self.response


def test_a_replica_killed_mid_run(tmp_path, tiny_model_dir):
    fleet = [replica(tmp_path / f"{label}.log", tiny_model_dir, 32768) for label in "cd"]
    router = router_for(tmp_path / "router.log", fleet, GATEWAY_POLICY="least_loaded")
    try:
        _killed_mid_run(router, fleet)
    finally:
        router.stop()
        for server in fleet:
            server.stop()


def _killed_mid_run(router: ServerProcess, fleet: list[ServerProcess]) -> None:
    long = completion("Once upon a time", max_tokens=1000)
    url = router.url + "/v1/completions"
    with httpx.Client(timeout=60) as http:
        # Least loaded over two replicas alternates: one stream and one whole request on each.
        streams = [http.stream("POST", url, json={**long, "stream": True}) for _ in fleet]
        opened = [s.__enter__() for s in streams]
        readers = [response.iter_lines() for response in opened]
        for reader in readers:
            next(line for line in reader if line)  # it is generating
        whole = []
        for _ in fleet:
            whole.append(Background(url, long))
            time.sleep(0.3)  # so the router counts it before it routes the next one
        victim = next(r for r in fleet if name(r) == opened[0].headers["x-upstream"])
        survivor = next(r for r in fleet if r is not victim)
        assert {response.headers["x-upstream"] for response in opened} == {
            name(victim),
            name(survivor),
        }
        victim.proc.kill()
        victim.proc.wait()  # dead: from now on its port refuses connections
        after = [
            http.post(
                url,
                json=completion("After the crash", max_tokens=4, stream=i % 2 == 1),
                headers=NO_CACHE,  # each one goes to a replica, not to the router's answer cache
            )
            for i in range(6)
        ]
        for response, reader, stream in zip(opened, readers, streams, strict=True):
            _, lines = streamed_text(reader)
            stream.__exit__(None, None, None)
            if response.headers["x-upstream"] == name(victim):
                error = json.loads(lines[-1][len("data: ") :])["error"]
                assert error["code"] == "upstream_failed" and error["type"] == "internal_error"
            else:
                assert lines[-1] == "data: [DONE]"
    statuses = {(w.result().status_code, w.result().headers["x-upstream"]) for w in whole}
    assert statuses == {(502, name(victim)), (200, name(survivor))}
    failed = next(w.result() for w in whole if w.result().status_code == 502)
    assert failed.json()["error"]["code"] == "upstream_failed"
    outcomes = [(r.status_code, r.headers.get("x-upstream")) for r in after]
    assert outcomes == [(200, name(survivor))] * len(after), [r.text[:300] for r in after]
    assert all(r.text.rstrip().endswith("data: [DONE]") for r in after[1::2])  # the streams
    health = httpx.get(router.url + "/health", timeout=10).json()
    assert health["upstreams"][name(victim)]["ready"] is False
