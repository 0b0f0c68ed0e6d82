"""Step 1: one model loaded at startup; generation off the event loop; concurrency is correct."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import tiny_client

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
REQUESTS = 4


def completion(url: str, prompt: str, max_tokens: int = 16) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def test_health_answers_while_a_long_generation_runs(start_server, tiny_model_dir):
    server = start_server("step1_central_loader", GATEWAY_MODEL=str(tiny_model_dir))
    body = {"model": MODEL, "prompt": "Go", "max_tokens": 1500, "temperature": 0, "stream": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", server.url + "/v1/completions", json=body) as response,
    ):
        lines = (line for line in response.iter_lines() if line)
        next(lines)  # generation has started
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        rest = list(lines)
    # /health was answered before the generation ended, which then ran to its full length.
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_are_all_served_correctly(start_server, real_model_dir):
    server = start_server("step1_central_loader")
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    alone = [completion(server.url, p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: completion(server.url, p), prompts))
    assert together == alone


def model_loads(step: str, model_dir, monkeypatch) -> int:
    """How many times the step loads the weights while it starts, then serves REQUESTS
    completions two at a time (in process: every load goes through from_pretrained)."""
    from transformers import AutoModelForCausalLM

    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    with tiny_client(step, model_dir) as client, ThreadPoolExecutor(2) as pool:
        sent = pool.map(lambda _: client.post("/v1/completions", json=body), range(REQUESTS))
        assert [r.status_code for r in sent] == [200] * REQUESTS
    return len(loads)


def test_the_model_is_loaded_once_for_every_request(tiny_model_dir, monkeypatch):
    assert model_loads("step1_central_loader", tiny_model_dir, monkeypatch) == 1


def test_the_count_sees_step_0s_load_per_request(tiny_model_dir, monkeypatch):
    """The design step 1 replaces: a fresh copy of the weights for every request."""
    assert model_loads("step0_bruteforce", tiny_model_dir, monkeypatch) == REQUESTS
