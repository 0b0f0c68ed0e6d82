"""Step 4's response cache on a real redis-server: shared hits, and outages that change nothing
for clients (Redis killed mid-test, Redis too slow to answer)."""

from __future__ import annotations

import threading
import time

import redis

from tests.conftest import tiny_client

CHAT = "/v1/chat/completions"


def chat(content: str) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0,
    }


def redis_client(tiny_model_dir, redis_server, **overrides):
    return tiny_client("step4_mock_kv", tiny_model_dir, redis_url=redis_server.url, **overrides)


def wait_for_keys(redis_server, count: int = 1) -> None:
    """Stores happen just after the response is sent: wait until Redis has them."""
    db = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 10
    while len(db.keys("gateway:response:*")) < count:
        assert time.monotonic() < deadline, "the response was never stored"
        time.sleep(0.02)


def wait_until_blocked(redis_server) -> None:
    """Until a PING with a 50 ms timeout fails: DEBUG SLEEP has Redis frozen."""
    probe = redis.Redis.from_url(redis_server.url, socket_timeout=0.05)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            probe.ping()
        except redis.TimeoutError:
            return
        time.sleep(0.01)
    raise AssertionError("Redis never blocked")


def test_hits_are_stored_in_redis_and_shared_between_servers(tiny_model_dir, redis_server):
    with redis_client(tiny_model_dir, redis_server) as a:
        first = a.post(CHAT, json=chat("shared answer"))
        assert first.headers["x-cache"] == "miss"
        wait_for_keys(redis_server)
    keys = redis.Redis.from_url(redis_server.url).keys("gateway:response:*")
    assert len(keys) == 1
    assert redis.Redis.from_url(redis_server.url).ttl(keys[0]) > 0
    with redis_client(tiny_model_dir, redis_server) as b:  # a second server process's view
        second = b.post(CHAT, json=chat("shared answer"))
    assert second.headers["x-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]


def test_redis_killed_mid_test_requests_keep_succeeding(tiny_model_dir, redis_server, caplog):
    with redis_client(tiny_model_dir, redis_server) as client:
        client.post(CHAT, json=chat("before the outage"))
        wait_for_keys(redis_server)
        assert client.post(CHAT, json=chat("before the outage")).headers["x-cache"] == "hit"
        redis_server.kill()
        for i in range(5):
            response = client.post(CHAT, json=chat(f"during the outage {i}"))
            assert response.status_code == 200
            assert response.json()["choices"][0]["message"]["content"] is not None
    assert any("response cache get bypassed" in r.message for r in caplog.records)


def test_slow_redis_is_bypassed_by_timeout(tiny_model_dir, redis_server, caplog):
    with redis_client(tiny_model_dir, redis_server, redis_timeout_s=0.1) as client:
        client.post(CHAT, json=chat("slow"))  # stored while Redis is fast
        wait_for_keys(redis_server)
        blocker = threading.Thread(
            target=lambda: redis.Redis.from_url(redis_server.url).execute_command(
                "DEBUG", "SLEEP", "2"
            )
        )
        blocker.start()
        wait_until_blocked(redis_server)
        try:
            response = client.post(CHAT, json=chat("slow"))
        finally:
            blocker.join()
    assert response.status_code == 200
    assert response.headers["x-cache"] == "miss"  # generated, not served from the cache
    assert any("TimeoutError" in r.message for r in caplog.records)
