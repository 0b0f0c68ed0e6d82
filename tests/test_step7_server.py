"""Step 7 is the full server: the paged engine keeps steps 4-6 around it (response cache,
metrics with KV-block and preemption counts, admission limits, readiness)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import tiny_client

BODY = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi there", "max_tokens": 5, "temperature": 0}


def values(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.labels
    }


def test_full_server_keeps_the_earlier_steps(tiny_model_dir):
    with tiny_client(
        "step7_real_kv", tiny_model_dir, num_kv_blocks=64, max_tokens_limit=8
    ) as client:
        first = client.post("/v1/completions", json=BODY)
        again = client.post("/v1/completions", json=BODY)
        too_long = client.post("/v1/completions", json={**BODY, "max_tokens": 9})
        ready = client.get("/health/ready")
        page = values(client.get("/metrics").text)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    assert again.headers["x-cache"] == "hit"  # step 4's response cache
    assert too_long.status_code == 400  # step 6's input limits
    assert ready.json() == {"status": "ready"}  # step 6's readiness
    assert "x-request-id" in first.headers  # step 5's request ids
    assert page["gateway_kv_blocks_total"] == 64
    assert page["gateway_kv_blocks_used"] == 0  # everything finished, every block back
    assert page["gateway_preemptions_total"] == 0
    assert page["gateway_prefix_cache_queried_tokens_total"] > 0
    assert page["gateway_generation_tokens_total"] == 10


def test_cached_prompt_tokens_are_reported_in_usage_logs_and_metrics(tiny_model_dir, caplog):
    prompt = "one two three four five six seven eight nine ten " * 4  # several 16-token blocks
    body = {**BODY, "prompt": prompt, "max_tokens": 2}
    with (
        caplog.at_level("INFO", logger="gateway.requests"),
        tiny_client("step7_real_kv", tiny_model_dir, num_kv_blocks=64, response_cache=False) as c,
    ):
        first = c.post("/v1/completions", json=body).json()["usage"]
        second = c.post("/v1/completions", json=body).json()["usage"]
        page = values(c.get("/metrics").text)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 16 and cached % 16 == 0 and cached < second["prompt_tokens"]
    logged = [r.fields["cached_prompt_tokens"] for r in caplog.records if hasattr(r, "fields")]
    assert logged == [0, cached]
    assert page["gateway_prompt_tokens_cached_total"] == cached


def test_step7_observes_its_batch_sizes(tiny_model_dir):
    with tiny_client("step7_real_kv", tiny_model_dir, num_kv_blocks=64) as client:
        before = values(client.get("/metrics").text)
        client.post("/v1/completions", json={**BODY, "max_tokens": 4, "prompt": "Batch me"})
        after = values(client.get("/metrics").text)
    assert after["gateway_batch_size_count"] - before.get("gateway_batch_size_count", 0) == 4
    assert after["gateway_batch_size_sum"] - before.get("gateway_batch_size_sum", 0) == 4


def test_a_prompt_larger_than_the_whole_pool_is_a_400_not_a_429(tiny_model_dir):
    """Retrying could never help, so no 429 and no Retry-After: the pool is 4 x 16 tokens."""
    with tiny_client("step7_real_kv", tiny_model_dir, num_kv_blocks=4) as client:
        prompt = "one two three four five six seven eight nine ten " * 8  # about 80 tokens
        too_big = client.post("/v1/completions", json={**BODY, "prompt": prompt})
        too_long = client.post("/v1/completions", json={**BODY, "max_tokens": 80})
        fits = client.post("/v1/completions", json=BODY)
    for response in (too_big, too_long):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert "retry-after" not in response.headers
    assert fits.status_code == 200
