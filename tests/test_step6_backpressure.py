"""Step 6: admission, deadlines, limits, health, drain, API key, and the server under abuse:
overload, disconnect storms, SIGTERM during load, a thousand malformed bodies, Redis outages."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.api import EngineLoad
from common.errors import APIError
from common.request import DeltaChannel, Request
from common.sampling import SamplingParams
from step6_backpressure.admission import AdmissionConfig, AdmissionController
from step6_backpressure.lifecycle import Lifecycle, LifecycleConfig
from tests.conftest import tiny_client

MODEL = "SmolLM2-135M-Instruct"
URL = "/v1/completions"


def body(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": 4, **fields}


def metric(server_url: str, name: str, **labels) -> float:
    text = httpx.get(server_url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# ---------------------------------------------------------------- admission, unit level


def limits(**overrides) -> AdmissionConfig:
    values = dict(
        max_waiting_requests=4,
        max_waiting_tokens=100,
        queue_timeout_s=30,
        max_queue_timeout_s=60,
        max_prompt_tokens=50,
        max_tokens_limit=20,
    )
    return AdmissionConfig(**{**values, **overrides})


class FakeEngine:
    """An engine as the door sees it: it answers load() and expire(), and owns what it says."""

    def __init__(self) -> None:
        self.now = EngineLoad()
        self.expired: list[Request] = []
        self.started: set[int] = set()  # ids of requests that have started

    def load(self) -> EngineLoad:
        return self.now

    def expire(self, request: Request, error: APIError) -> bool:
        if id(request) in self.started:
            return False
        self.expired.append(request)
        request.fail(error)
        return True

    async def submit(self, request: Request) -> None:
        pass


def door(**overrides) -> tuple[AdmissionController, FakeEngine, Lifecycle]:
    engine, lifecycle = FakeEngine(), Lifecycle(LifecycleConfig())
    return AdmissionController(limits(**overrides), engine, lifecycle, 10), engine, lifecycle


def a_request(tokenizer, prompt_tokens: int = 5) -> Request:
    return Request([7] * prompt_tokens, SamplingParams(), 4, tokenizer, {0})


def test_the_door_counts_what_the_engine_holds_and_keeps_no_list_of_its_own(tokenizer):
    async def scenario() -> None:
        admission, engine, lifecycle = door()  # at most 4 waiting, 100 waiting tokens
        engine.now = EngineLoad(waiting=3, waiting_tokens=90)
        admission.admit(a_request(tokenizer, 10))  # 4th waiting, exactly 100 tokens: in
        engine.now = EngineLoad(waiting=3, waiting_tokens=91)
        with pytest.raises(APIError) as too_many_tokens:
            admission.admit(a_request(tokenizer, 10))
        engine.now = EngineLoad(waiting=4, waiting_tokens=0)
        with pytest.raises(APIError) as full:
            admission.admit(a_request(tokenizer, 1))
        assert (too_many_tokens.value.code, full.value.code) == ("queue_tokens", "queue_full")
        assert admission.saturated() and admission.in_flight() == 4
        engine.now = EngineLoad(waiting=0, running=2)
        assert not admission.saturated() and admission.in_flight() == 2
        lifecycle.start_drain()  # the lifecycle owns draining; the door asks it
        with pytest.raises(APIError) as draining:
            admission.admit(a_request(tokenizer, 1))
        assert (draining.value.status, draining.value.code) == (503, "draining")
        assert not hasattr(admission, "live")

    asyncio.run(scenario())


def test_a_deadline_asks_the_engine_to_take_out_what_has_not_started(tokenizer):
    async def scenario() -> tuple[list[Request], Request, Request, int]:
        admission, engine, _ = door(queue_timeout_s=0.05)
        waiting, started = a_request(tokenizer), a_request(tokenizer)
        engine.started.add(id(started))
        for request in (waiting, started):
            request.channel = DeltaChannel()
            admission.admit(request)
        await asyncio.sleep(0.2)
        return engine.expired, waiting, started, admission.reasons["timeout:queue"]

    expired, waiting, started, timeouts = asyncio.run(scenario())
    assert expired == [waiting] and timeouts == 1  # the started one is the engine's to finish
    assert waiting.finished and not started.finished


def test_retry_after_follows_the_drain_rate():
    admission, _, _ = door()
    assert admission.retry_after_s() == 1  # nothing observed yet: come back soon
    now = time.monotonic()
    admission._finished.extend([now] * 5)  # 0.5 requests per second
    assert admission.retry_after_s() == 2  # one request (the asker) / 0.5 per s
    admission._finished.clear()
    admission._finished.append(now)  # 0.1 per second: 10 s, capped at 60 at most
    assert admission.retry_after_s() == 10


# ---------------------------------------------------------------- in-process HTTP behaviour


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with tiny_client(
        "step6_backpressure",
        tiny_model_dir,
        max_prompt_tokens=64,
        max_tokens_limit=16,
        max_body_bytes=4000,
        response_cache=False,
    ) as c:
        yield c


def test_input_limits(client):
    long = client.post(URL, json=body(prompt="word " * 200))
    assert long.status_code == 400 and long.json()["error"]["code"] == "prompt_too_long"
    many = client.post(URL, json=body(max_tokens=17))
    assert many.status_code == 400 and many.json()["error"]["code"] == "max_tokens_too_large"
    big = client.post(URL, content=json.dumps(body(prompt="x" * 5000)))
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    stops = client.post(URL, json=body(stop=["a", "b", "c", "d", "e"]))
    assert stops.status_code == 400 and stops.json()["error"]["param"] == "stop"
    assert client.post(URL, json=body()).status_code == 200
    # Each endpoint's own name for its prompt: `prompt` here, `messages` on chat.
    assert long.json()["error"]["param"] == "prompt"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 200}]}
    long_chat = client.post("/v1/chat/completions", json=chat)
    assert long_chat.json()["error"]["param"] == "messages"


def test_liveness_and_readiness(client):
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").json() == {"status": "ready"}


def test_bad_queue_timeout_header_is_a_400(client):
    response = client.post(URL, json=body(), headers={"X-Queue-Timeout": "soon"})
    assert response.status_code == 400 and "x-queue-timeout" in response.json()["error"]["message"]


def test_api_key(tiny_model_dir):
    with tiny_client("step6_backpressure", tiny_model_dir, api_key="s3cret") as c:
        assert c.post(URL, json=body()).status_code == 401
        wrong = c.post(URL, json=body(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        good = c.post(URL, json=body(), headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        for scheme in ("bearer", "BEARER", "beaRer"):  # the scheme is case-insensitive
            response = c.post(URL, json=body(), headers={"Authorization": f"{scheme} s3cret"})
            assert response.status_code == 200, scheme
        assert (
            c.post(URL, json=body(), headers={"Authorization": "Basic s3cret"}).status_code == 401
        )
        assert c.get("/health/ready").status_code == 200  # probes need no key


# ---------------------------------------------------------------- fuzz

VALID = {
    "model": [MODEL],
    "prompt": ["hi", [1, 2, 3]],
    "max_tokens": [1, 2],
    "temperature": [0, 0.5],
    "top_p": [0.9, 1],
    "top_k": [-1, 5],
    "stop": ["x", ["a", "b"]],
    "seed": [1, 99],
    "stream": [False, True],
    "n": [1],
}
INVALID = {
    "model": [None, 3, "", "gpt-4", [MODEL], {"a": 1}],
    "prompt": [None, "", [], [-1], [10**9], [1.5], {"t": 1}, ["a", "b"], True],
    "max_tokens": [0, -5, 1.5, "4", True, 10**12, []],
    "temperature": [-0.1, 2.5, "hot", [], {}, float("inf")],
    "top_p": [0, -1, 1.5, "x", "0.5"],
    "top_k": [0, -2, 1.5, "3", []],
    "stop": ["", [""], [1], ["a"] * 5, {"a": 1}, 7],
    "seed": [1.5, "7", [], {}],
    "stream": ["yes", 1, [], {}],
    "n": [0, 9, "1", 1.5],
    "stream_options": [[1], "x", 3],
}


def malformed_bodies(count: int, seed: int = 1234):
    """Schema-driven: a valid body with one field made invalid, or a body broken as a whole."""
    rng = random.Random(seed)
    wholes = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"text"',
        b"\xff\xfe\x00",
        b'{"model": }',
        json.dumps({"a": [[[[[[[[[[1]]]]]]]]]]}).encode(),
        b"1e999999",
        b"{" * 500,
    ]
    for i in range(count):
        if i % 10 == 0:
            yield rng.choice(wholes)
            continue
        fields = {
            k: rng.choice(v)
            for k, v in VALID.items()
            if rng.random() < 0.7 or k in ("model", "prompt")
        }
        broken = rng.choice(sorted(INVALID))
        fields[broken] = rng.choice(INVALID[broken])
        if rng.random() < 0.5:
            fields[f"unknown_{rng.randint(0, 9)}"] = rng.random()
        yield json.dumps(fields, allow_nan=True).encode()


def test_a_thousand_malformed_bodies_get_only_4xx_and_the_server_keeps_serving(client):
    statuses = {}
    for raw in malformed_bodies(1200):
        response = client.post(URL, content=raw)
        statuses.setdefault(response.status_code, 0)
        statuses[response.status_code] += 1
        assert 400 <= response.status_code < 500, (raw[:200], response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert sum(statuses.values()) == 1200
    assert client.post(URL, json=body()).status_code == 200


# ---------------------------------------------------------------- real servers under abuse


def start(start_server, tiny_model_dir, **env):
    settings = {"GATEWAY_MODEL": str(tiny_model_dir), "GATEWAY_RESPONSE_CACHE": "false", **env}
    return start_server("step6_backpressure", **settings)


@pytest.mark.integration
def test_overload_every_request_gets_one_fast_outcome(start_server, tiny_model_dir):
    server = start(
        start_server,
        tiny_model_dir,
        GATEWAY_MAX_BATCH_SIZE="2",
        GATEWAY_MAX_WAITING_REQUESTS="3",
        GATEWAY_QUEUE_TIMEOUT_S="20",
    )
    sent = 40

    def one(i):
        response = httpx.post(
            server.url + URL,
            json=body(prompt=f"p{i}", max_tokens=300, temperature=1.0),
            timeout=120,
        )
        return response.status_code, response.headers.get("retry-after")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(sent)))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429, 503}
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    assert all(r is not None and int(r) >= 1 for s, r in results if s == 429)
    # The server's own accounting agrees with the client, request for request.
    assert metric(server.url, "gateway_requests_total") == sent
    assert metric(server.url, "gateway_requests_total", outcome="success") == statuses.count(200)
    rejected = statuses.count(429) + statuses.count(503)
    assert metric(server.url, "gateway_requests_total", outcome="rejected") == rejected
    assert metric(server.url, "gateway_admission_events_total") >= statuses.count(429)


@pytest.mark.integration
def test_queue_deadline_gives_a_clear_error_instead_of_a_late_answer(start_server, tiny_model_dir):
    server = start(start_server, tiny_model_dir, GATEWAY_MAX_BATCH_SIZE="1")
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", server.url + URL, json=body(max_tokens=1000, stream=True)) as busy,
    ):
        lines = busy.iter_lines()
        next(lines)  # the worker is busy with this one
        late = http.post(server.url + URL, json=body(), headers={"X-Queue-Timeout": "0.3"})
        streamed = http.post(
            server.url + URL, json=body(stream=True), headers={"X-Queue-Timeout": "0.3"}
        )
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "queue_timeout" and "retry-after" in late.headers
    assert '"queue_timeout"' in streamed.text  # headers were sent: the error comes in-band
    assert metric(server.url, "gateway_admission_events_total", reason="timeout:queue") == 2


@pytest.mark.integration
def test_disconnect_storm_leaves_no_running_work_and_no_leaked_tasks(start_server, tiny_model_dir):
    server = start(start_server, tiny_model_dir, GATEWAY_MAX_BATCH_SIZE="4")
    baseline = metric(server.url, "gateway_event_loop_tasks")

    def hang_up(i):
        with (
            httpx.Client(timeout=60) as http,
            http.stream(
                "POST", server.url + URL, json=body(prompt=f"s{i}", max_tokens=1000, stream=True)
            ) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            if i % 2:
                next(lines)  # half leave mid-stream, half before their first token

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(hang_up, range(20)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = metric(server.url, "gateway_requests_running")
        waiting = metric(server.url, "gateway_requests_waiting")
        cancelled = metric(server.url, "gateway_requests_total", outcome="cancelled")
        if running == waiting == 0 and cancelled == 20:
            break
        time.sleep(0.5)
    assert (running, waiting, cancelled) == (0, 0, 20)
    assert metric(server.url, "gateway_event_loop_tasks") <= baseline + 1  # the scrape's own
    assert httpx.post(server.url + URL, json=body(), timeout=30).status_code == 200


@pytest.mark.integration
def test_sigterm_during_load_finishes_in_flight_and_refuses_new(start_server, tiny_model_dir):
    server = start(
        start_server,
        tiny_model_dir,
        GATEWAY_MAX_BATCH_SIZE="4",
        GATEWAY_MAX_WAIT_MS="3000",
        GATEWAY_QUEUE_TIMEOUT_S="120",
        GATEWAY_DRAIN_TIMEOUT_S="120",
    )
    results = []

    def long(i):
        r = httpx.post(server.url + URL, json=body(prompt=f"d{i}", max_tokens=300), timeout=300)
        finish = r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else r.text
        results.append((r.status_code, finish))

    workers = [threading.Thread(target=long, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60  # all three in one batch (max_wait_ms gathers them)
    while metric(server.url, "gateway_requests_running") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(server.url + URL, json=body(), timeout=30)
    ready = httpx.get(server.url + "/health/ready", timeout=30)
    for w in workers:
        w.join()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert ready.status_code == 503 and ready.json()["reason"] == "draining"
    assert results == [(200, "length")] * 3, server.log()
    assert server.proc.wait(timeout=60) == 0


@pytest.mark.integration
def test_redis_outage_during_load_changes_nothing_for_clients(
    start_server, tiny_model_dir, redis_server
):
    server = start(
        start_server,
        tiny_model_dir,
        GATEWAY_RESPONSE_CACHE="true",
        GATEWAY_REDIS_URL=redis_server.url,
    )
    statuses = []

    def load(n):
        for i in range(n):
            r = httpx.post(
                server.url + URL, json=body(prompt=f"r{i % 5}", temperature=0), timeout=60
            )
            statuses.append(r.status_code)

    worker = threading.Thread(target=load, args=(40,))
    worker.start()
    time.sleep(1.0)
    redis_server.kill()
    worker.join()
    assert statuses == [200] * 40
    assert metric(server.url, "gateway_response_cache_errors_total") >= 1
