"""Property-based fuzzing of the HTTP API (hypothesis), through a real step 7 server on the tiny
random model: no body, however hostile, gets a 5xx or hurts the requests after it.

Bodies are drawn from several families: valid requests (which must get a 200 with a whole
answer), valid requests with one field replaced by any JSON value, extreme and non-finite
numbers, unknown fields, huge strings, deep nesting, invalid UTF-8 and lone surrogates, and
bodies over the size limit. Every answer must be a 200 or a 4xx in OpenAI's error shape; a greedy
request made afterwards must answer exactly as it did before.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_BODY_BYTES = 20_000
EXAMPLES = 1100  # at least 1,000 bodies per run, across both endpoints

FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "presence_penalty",
    "frequency_penalty", "logprobs", "top_logprobs", "logit_bias", "response_format", "tools",
    "tool_choice", "best_of", "echo",
]  # fmt: skip
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# The structured fields at their edges: schemas that are no schemas, huge ones, counts out of
# range, bias keys that are no token ids, tool choices that name nothing.
API_EDGES = {
    "n": [0, 1, 3, 8, 9, 10**9, -1],
    "logprobs": [True, False, 0, 5, 20, 21, -1],
    "top_logprobs": [0, 20, 21, -1],
    "logit_bias": [{"0": 100}, {"49151": -100}, {"49152": 1}, {"-1": 1}, {"a": 1}, {"1": 101},
                   {str(i): 1 for i in range(2000)}, {"1": float("inf")}, {"1": None}],
    "response_format": [
        {"type": "json_object"}, {"type": "text"}, {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#/nowhere"}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "integer"}}},
        {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["x" * 99] * 999}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"allOf": [{}] * 50}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}},
    ],
    "tools": [[TOOL], [TOOL, TOOL], [{"type": "function"}], [{"type": "code"}], [TOOL] * 65],
    "tool_choice": ["none", "auto", "required", "any", {"type": "function"},
                    {"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {"name": "g"}}],
    "best_of": [1, 2, 0],
    "echo": [True, False],
}  # fmt: skip
EXTREMES = [
    0, -1, 1, 2**31, 2**63, -(2**63) - 1, 2**64, 10**40, -(10**40),
    5e-324, sys.float_info.min, sys.float_info.max, 1e-320, -0.0, 0.999999, 2.0000001,
]  # fmt: skip


def valid_base(endpoint: str) -> dict:
    body: dict = {"model": MODEL, "max_tokens": 3}
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return body


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
valid_sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.sampled_from([0, 0.0, 1e-320, 1e-6, 0.7, 2]),
        "top_p": st.sampled_from([5e-324, 1e-30, 0.5, 1]),
        "top_k": st.sampled_from([-1, 1, 3, 2**31 - 1]),
        "seed": st.sampled_from([-(2**63), -1, 0, 42, 2**63, 2**64 - 1]),
        "presence_penalty": st.sampled_from([-2, -0.5, 0, 2]),
        "frequency_penalty": st.sampled_from([-2, 0, 1.5, 2]),
        "stream": st.booleans(),
        "stop": st.sampled_from(["x", ["a", "bb"], "\n"]),
        "max_tokens": st.integers(1, 8),
    },
)


def encode(body: object) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as bare tokens


@st.composite
def bodies(draw, endpoint: str) -> bytes:
    base = valid_base(endpoint)
    families = ["valid", "field", "extreme", "unknown", "text", "raw", "api"]
    family = draw(st.sampled_from(families))
    if family == "valid":
        return encode({**base, **draw(valid_sampling)})
    if family == "api":  # the structured fields, one to three of them, at their edges
        names = draw(st.lists(st.sampled_from(sorted(API_EDGES)), min_size=1, max_size=3))
        return encode({**base, **{name: draw(st.sampled_from(API_EDGES[name])) for name in names}})
    if family == "field":  # one field of any JSON value (wrong types, nulls, nesting)
        return encode({**base, draw(st.sampled_from(FIELDS)): draw(json_values)})
    if family == "extreme":
        number = draw(st.sampled_from(EXTREMES) | st.floats(allow_nan=True))
        return encode({**base, draw(st.sampled_from(FIELDS)): number})
    if family == "unknown":
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=5))
        return encode({**extra, **base})
    if family == "text":  # any unicode, huge strings, in the prompt or the model name
        text = draw(st.text(max_size=50) | st.just("z" * draw(st.integers(1000, 40_000))))
        where = draw(st.sampled_from(["prompt", "model"]))
        if where == "model":
            return encode({**base, "model": text})
        if endpoint.endswith("chat/completions"):
            return encode({**base, "messages": [{"role": "user", "content": text}]})
        return encode({**base, "prompt": text})
    return draw(raw_bodies(base))


@st.composite
def raw_bodies(draw, base: dict) -> bytes:
    """Bytes no JSON encoder writes: broken UTF-8, lone surrogates, deep nesting, huge ints."""
    kind = draw(st.sampled_from(["binary", "surrogate", "deep", "bigint", "cut"]))
    valid = encode(base)
    if kind == "binary":
        return draw(st.binary(max_size=64)) + valid[: draw(st.integers(0, len(valid)))]
    if kind == "surrogate":
        escape = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\ud800\\u0041"]))
        field = draw(st.sampled_from(["model", "prompt", "content"]))
        text = valid.decode().replace('"hi"', f'"{escape}"')
        return (
            text.replace(f'"{MODEL}"', f'"{escape}"').encode()
            if field == "model"
            else text.encode()
        )
    if kind == "deep":
        depth = draw(st.integers(100, 100_000))
        return b'{"model": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "bigint":
        digits = draw(st.integers(20, 6000))
        return valid.replace(b'"max_tokens": 3', b'"max_tokens": ' + b"9" * digits)
    return valid[: draw(st.integers(0, len(valid) - 1))]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from tests.conftest import ServerProcess

    env = {
        "GATEWAY_MODEL": str(tiny_model_dir),
        "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "GATEWAY_MAX_TOKENS_LIMIT": "8",
        "GATEWAY_DEFAULT_MAX_TOKENS": "4",
        "GATEWAY_RESPONSE_CACHE": "false",
        "GATEWAY_LOG_LEVEL": "warning",
    }
    proc = ServerProcess("step7_real_kv", tmp_path_factory.mktemp("fuzz") / "server.log", env)
    yield proc
    proc.stop()


def greedy_answers(http: httpx.Client) -> list[str]:
    answers = []
    for endpoint in ENDPOINTS:
        body = {**valid_base(endpoint), "max_tokens": 8, "temperature": 0}
        response = http.post(endpoint, json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        answers.append(choice["message"]["content"] if "message" in choice else choice["text"])
    return answers


def check_answer(response: httpx.Response, raw: bytes) -> None:
    """A 4xx in OpenAI's error shape, or a 200 with a whole answer: never a 5xx."""
    status = response.status_code
    assert status < 500, (raw[:300], response.text[:300])
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert "Traceback" not in response.text
        return
    assert status == 200
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), response.text
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_fuzzed_bodies_get_a_4xx_or_a_200_never_a_5xx(server):
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = greedy_answers(http)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def check(data) -> None:
            endpoint = data.draw(st.sampled_from(ENDPOINTS))
            raw = data.draw(bodies(endpoint))
            headers = {"content-type": "application/json"}
            response = http.post(endpoint, content=raw, headers=headers)
            seen[f"{endpoint} {response.status_code}"] += 1
            check_answer(response, raw)

        check()
        after = greedy_answers(http)
    assert sum(seen.values()) >= 1000, seen
    assert any(key.endswith(" 200") for key in seen) and any(" 4" in key for key in seen)
    assert any(key.endswith(" 413") for key in seen), seen  # some bodies were over the limit
    assert after == before  # nothing it was sent changed what a greedy request gets


def test_bad_sampling_requests_do_not_hurt_healthy_streams_in_the_same_batch(
    tiny_model_dir, tmp_path
):
    """Healthy greedy streams run while requests with extreme (valid) and invalid sampling
    parameters arrive and join their iterations: each healthy stream ends with the text it has
    when it runs alone."""
    from tests.conftest import ServerProcess

    env = {"GATEWAY_MODEL": str(tiny_model_dir), "GATEWAY_RESPONSE_CACHE": "false"}
    server = ServerProcess("step7_real_kv", tmp_path / "server.log", env)
    prompts = ["first healthy", "second healthy", "third healthy"]
    hostile = [
        {"temperature": 1e-320},
        {"temperature": 2, "top_p": 5e-324},
        {"temperature": 1, "seed": -(2**63)},
        {"temperature": 1, "seed": 2**64 - 1, "top_k": 2**31 - 1},
        {"temperature": 0.5, "presence_penalty": 2, "frequency_penalty": -2},
        {"temperature": float("nan")},
        {"seed": 2**64},
        {"top_p": float("inf")},
    ]

    def body(prompt: str, **fields) -> dict:
        return {"model": MODEL, "prompt": prompt, "max_tokens": 300, "temperature": 0, **fields}

    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            alone = [http.post("/v1/completions", json=body(p)).json() for p in prompts]
            streams = [
                http.stream("POST", "/v1/completions", json=body(p, stream=True)) for p in prompts
            ]
            responses = [s.__enter__() for s in streams]
            lines = [r.iter_lines() for r in responses]
            texts = [[] for _ in prompts]
            for i, it in enumerate(lines):  # every healthy stream is running
                texts[i].append(next(line for line in it if line.startswith("data:")))
            statuses = [
                http.post("/v1/completions", content=encode(body("bad", **f))).status_code
                for f in hostile
            ]
            for i, it in enumerate(lines):
                texts[i].extend(line for line in it if line.startswith("data:"))
            for s in streams:
                s.__exit__(None, None, None)
    finally:
        server.stop()
    assert statuses == [200] * 5 + [400] * 3
    for whole, events in zip(alone, texts, strict=True):
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert streamed == whole["choices"][0]["text"]
