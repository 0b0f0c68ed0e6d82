"""The HTTP API on the tiny model, in-process: bad input, SSE format, internal faults.

Runs against step 1's app; the contract test runs the same API over every step with real servers.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_client

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with tiny_client("step1_central_loader", tiny_model_dir) as c:
        yield c


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}


def assert_error(response, status: int, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words in error["message"]
    assert "Traceback" not in response.text


BAD_BODIES = [
    pytest.param(b"{not json", None, "not valid JSON", id="bad-json"),
    pytest.param(b"[1, 2]", None, "JSON object", id="not-an-object"),
    pytest.param({"model": MODEL}, "messages", "non-empty array", id="missing-messages"),
    pytest.param(chat(messages=[]), "messages", "non-empty array", id="empty-messages"),
    pytest.param(
        chat(messages=[{"role": "robot", "content": "x"}]),
        "messages[0].role",
        "must be one of",
        id="bad-role",
    ),
    pytest.param(
        chat(messages=[{"role": "user", "content": 5}]),
        "messages[0].content",
        "must be a string",
        id="content-type",
    ),
    pytest.param(chat(model=None), "model", "non-empty string", id="missing-model"),
    pytest.param(chat(model="gpt-9"), "model", "does not exist", id="unknown-model"),
    pytest.param(chat(temperature="hot"), "temperature", "must be a number", id="wrong-type"),
    pytest.param(chat(temperature=2.5), "temperature", "between 0.0 and 2.0", id="temp-range"),
    pytest.param(chat(top_p=0), "top_p", "in (0.0, 1.0]", id="top-p-range"),
    pytest.param(chat(top_k=0), "top_k", "-1 (disabled)", id="top-k-zero"),
    pytest.param(chat(max_tokens=0), "max_tokens", "at least 1", id="max-tokens-zero"),
    pytest.param(chat(max_tokens=1.5), "max_tokens", "an integer", id="max-tokens-float"),
    pytest.param(chat(max_tokens=True), "max_tokens", "an integer", id="max-tokens-bool"),
    pytest.param(chat(max_tokens=10**6), "max_tokens", "context window", id="context-window"),
    pytest.param(chat(n=9), "n", "from 1 to 8", id="n-over-the-limit"),
    pytest.param(chat(n=0), "n", "from 1 to 8", id="n-zero"),
    # The fields this API honours beyond the basics, each refused clearly when wrong.
    pytest.param(chat(top_logprobs=3), "top_logprobs", "needs 'logprobs'", id="top-no-lp"),
    pytest.param(chat(logprobs=True, top_logprobs=21), "top_logprobs", "0 to 20", id="top-lp"),
    pytest.param(chat(logit_bias={"x": 1}), "logit_bias", "token ids", id="bias-key"),
    pytest.param(chat(logit_bias={"5": 101}), "logit_bias", "[-100, 100]", id="bias-value"),
    pytest.param(chat(logit_bias={"999999": 1}), "logit_bias", "vocabulary", id="bias-vocab"),
    pytest.param(
        chat(response_format={"type": "xml"}), "response_format.type", "json_schema", id="fmt"
    ),
    pytest.param(
        chat(response_format={"type": "json_schema"}),
        "response_format",
        "needs json_schema",
        id="fmt-no-schema",
    ),
    pytest.param(
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
            }
        ),
        "response_format",
        "cannot be used",
        id="fmt-bad-schema",
    ),
    pytest.param(
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"enum": ["a" * 100] * 400}},
            }
        ),
        "response_format.json_schema.schema",
        "bytes of JSON",
        id="fmt-huge-schema",
    ),
    pytest.param(
        chat(tool_choice={"type": "function", "function": {"name": "nope"}}),
        "tool_choice",
        "not one of the tools",
        id="tool-unknown",
    ),
    pytest.param(chat(tool_choice="required"), "tool_choice", "needs tools", id="tool-required"),
    pytest.param(chat(functions=[{"name": "f"}]), "functions", "use tools", id="functions"),
    pytest.param(chat(audio={"voice": "x"}), "audio", "not supported", id="audio"),
    pytest.param(chat(stop=[""]), "stop", "non-empty string", id="empty-stop"),
    pytest.param(chat(stop=["a"] * 5), "stop", "at most 4", id="too-many-stops"),
    pytest.param(chat(stream="yes"), "stream", "boolean", id="stream-type"),
    pytest.param(chat(stream_options=[1]), "stream_options", "an object", id="stream-options"),
    pytest.param(chat(seed="abc"), "seed", "an integer", id="seed-type"),
    # What a JSON parser or a torch generator chokes on: each one a 400 with its param.
    pytest.param(b'{"model": "m", "temperature": NaN}', "temperature", "finite", id="nan"),
    pytest.param(chat(top_p=float("inf")), "top_p", "finite", id="infinity"),
    pytest.param(chat(seed=2**64), "seed", "2^64 - 1", id="seed-too-big"),
    pytest.param(chat(seed=-(2**63) - 1), "seed", "-2^63", id="seed-too-small"),
    pytest.param(chat(presence_penalty=2.5), "presence_penalty", "-2.0 and 2.0", id="penalty"),
    pytest.param(chat(max_tokens="4"), "max_tokens", "an integer", id="strict-int"),
    pytest.param(chat(stream=1), "stream", "a boolean", id="strict-bool"),
    pytest.param(
        b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", None, "not valid JSON", id="bigint"
    ),
    pytest.param(b"[" * 50_000 + b"]" * 50_000, None, "not valid JSON", id="deep"),
    pytest.param(b'{"model": "\\ud800"}', None, "not valid JSON", id="surrogate-model"),
    pytest.param(
        json.dumps(chat()).replace('"hi"', '"\\udfff"').encode(), None, "JSON", id="surrogate"
    ),
    pytest.param(b'{"model": "caf\xe9"}', None, "not valid JSON", id="invalid-utf8"),
    pytest.param(
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        "messages[0].content[0].type",
        "text",
        id="image-part",
    ),
]


@pytest.mark.parametrize("body, param, words", BAD_BODIES)
def test_bad_chat_input_is_a_400_and_the_server_keeps_serving(client, body, param, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert_error(client.post(CHAT, content=raw), 400, param, words)
    assert client.post(CHAT, json=chat()).status_code == 200


EXTREME_BUT_VALID = [
    {"temperature": 1e-320},  # below 1e-5: greedy, where dividing by it would overflow
    {"temperature": 1.0, "top_p": 5e-324},  # rounds to 0 in float32: the top token stays
    {"temperature": 1.0, "seed": -(2**63)},
    {"temperature": 1.0, "seed": 2**64 - 1, "top_k": 2**31 - 1},
    {"temperature": 0.7, "presence_penalty": 2.0, "frequency_penalty": -2.0},
    {"temperature": None, "top_p": None, "stop": None, "unknown_field": {"x": [1]}},
]


@pytest.mark.parametrize("fields", EXTREME_BUT_VALID)
def test_extreme_but_valid_sampling_is_served(client, fields):
    response = client.post(CHAT, json=chat(**fields))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_completion_prompts(client):
    url = "/v1/completions"
    assert_error(client.post(url, json={"model": MODEL}), 400, "prompt", "non-empty")
    assert_error(
        client.post(url, json={"model": MODEL, "prompt": ["a", "b"]}),
        400,
        "prompt",
        "one prompt per request",
    )
    huge = {"model": MODEL, "prompt": [10**7]}
    assert_error(client.post(url, json=huge), 400, "prompt", "outside the vocabulary")
    long_prompt = {"model": MODEL, "prompt": [5] * 2048, "max_tokens": 1}
    # the completions endpoint names its own prompt field, not chat's messages
    assert_error(client.post(url, json=long_prompt), 400, "prompt", "context window")


def test_unknown_route_and_wrong_method(client):
    assert_error(client.get("/v1/nothing"), 404, None, "no route")
    assert_error(client.get(CHAT), 405, None, "method not allowed")


def test_models_and_health(client):
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == MODEL


def test_usage_and_finish_reason_length(client):
    body = client.post(CHAT, json=chat(max_tokens=3, temperature=0)).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3


def test_max_completion_tokens_is_accepted(client):
    body = client.post(CHAT, json=chat(max_tokens=None, max_completion_tokens=2)).json()
    assert body["usage"]["completion_tokens"] == 2


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_sse_chunk_format_with_usage(client):
    req = chat(max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", CHAT, json=req) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk, first = events[-2], events[-3], events[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert len({e["id"] for e in events[:-1]}) == 1
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2])
    whole = client.post(CHAT, json=chat(max_tokens=5, temperature=0)).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def test_sse_without_usage_has_no_usage_chunk(client):
    req = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=req) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_seeded_sampling_is_reproducible_over_http(client):
    req = chat(max_tokens=12, temperature=1.0, seed=1234)
    a, b = (client.post(CHAT, json=req).json()["choices"][0]["message"]["content"] for _ in "ab")
    c = client.post(CHAT, json=chat(max_tokens=12, temperature=1.0, seed=99)).json()
    assert a == b
    assert c["choices"][0]["message"]["content"] != a


def test_internal_fault_is_a_500_without_traceback_and_the_server_recovers(tiny_model_dir):
    with tiny_client("step1_central_loader", tiny_model_dir) as client:
        model = client.app.state.serving.engine.lm.model
        original = model.forward

        def broken(*args, **kwargs):
            raise RuntimeError("simulated fault deep inside the model")

        model.forward = broken
        response = client.post(CHAT, json=chat())
        assert_error(response, 500, None, "internal server error")
        assert "simulated fault" not in response.text
        model.forward = original
        assert client.post(CHAT, json=chat()).status_code == 200
