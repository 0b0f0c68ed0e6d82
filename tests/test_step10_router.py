"""Step 10 as processes on the tiny model: a prefill engine, a decode engine and the router
between them, driven through the official `openai` client and plain HTTP. The two phases,
streamed and not; the blocks over the socket; a prefill engine gone before the decode engine
fetched (recompute and fail policies); a decode engine killed mid-stream; the local engines
of `python -m step10_disaggregated` gone with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from step10_disaggregated.http_connector import VIAS
from tests.conftest import ServerProcess
from tests.test_step9_router import metric, streamed_text

MODEL = "SmolLM2-135M-Instruct"
# About 60 tokens: three full blocks of 16 handed over.
PROMPT = (
    "The quick brown fox jumps over the lazy dog and runs far away into the forest, where the "
    "trees are tall and the rivers are wide, and nobody has ever been before, not even the "
    "oldest of the owls that live in the hollow oaks by the lake."
)


def engine(path, model_dir, engine_id: str, **env: str) -> ServerProcess:
    return ServerProcess(
        "step10_disaggregated.engine_server",
        path,
        {
            "GATEWAY_MODEL": str(model_dir),
            "GATEWAY_RESPONSE_CACHE": "false",
            "GATEWAY_ENGINE_ID": engine_id,
            **env,
        },
    )


def router_for(path, prefill: ServerProcess, decode: ServerProcess, **env) -> ServerProcess:
    return ServerProcess(
        "step10_disaggregated",
        path,
        {
            "GATEWAY_PREFILL_UPSTREAMS": prefill.url,
            "GATEWAY_DECODE_UPSTREAMS": decode.url,
            "GATEWAY_HEALTH_INTERVAL_S": "0.2",
            "GATEWAY_RESPONSE_CACHE": "false",
            "GATEWAY_LOCAL_PREFILL_CHARS": "0",  # every prompt handed over, however short
            **env,
        },
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir):
    logs = tmp_path_factory.mktemp("step10")
    started: list[ServerProcess] = []
    try:
        started.append(engine(logs / "prefill.log", tiny_model_dir, "prefill"))
        started.append(engine(logs / "decode.log", tiny_model_dir, "decode"))
        started.append(router_for(logs / "router.log", *started))
        yield started
    finally:
        for server in reversed(started):
            server.stop()


def completion(prompt: str = PROMPT, **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **fields}


def alone(server: ServerProcess, body: dict) -> str:
    """The answer of one engine by itself (step 8's engine: step 7's greedy tokens)."""
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    return response.json()["choices"][0]["text"]


def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_two_phases_through_the_openai_client(fleet):
    prefill, decode, router = fleet
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    expected = alone(prefill, completion())
    received = metric(decode.url, "gateway_kv_transfer_blocks_total", direction="received")
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage.prompt_tokens == 52
    assert whole.usage.prompt_tokens_details.cached_tokens == 51  # all but the last token
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT + " Again.", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == alone(prefill, completion(PROMPT + " Again."))
    assert chunks[-1].usage.completion_tokens == 12
    after = metric(decode.url, "gateway_kv_transfer_blocks_total", direction="received")
    # 51 tokens: 3 full blocks and a partial one; then the second prompt's partial block (it
    # shares the first's 3 full blocks, which the decode engine holds already)
    assert after - received == 4 + 1
    until(lambda: metric(prefill.url, "gateway_kv_leases_held") == 0)
    assert metric(prefill.url, "gateway_kv_leases_ended_total", how="confirmed") >= 2
    for server in (prefill, decode):
        assert metric(server.url, "gateway_kv_blocks_used") == 0


def test_a_short_prompt_is_prefilled_by_the_decode_engine(tmp_path, fleet):
    """Conditional disaggregation: under local_prefill_chars, no prefill phase, nothing moved,
    the same answer; over it, handed over as before."""
    prefill, decode, _ = fleet
    router = router_for(
        tmp_path / "router.log", prefill, decode, GATEWAY_LOCAL_PREFILL_CHARS=str(len(PROMPT))
    )
    try:
        short, long = completion("Short: " + PROMPT[:100]), completion("Longer: " + PROMPT)
        received = metric(decode.url, "gateway_kv_transfer_blocks_total", direction="received")
        answer = httpx.post(router.url + "/v1/completions", json=short, timeout=60).json()
        assert answer["choices"][0]["text"] == alone(prefill, short)
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert metric(decode.url, "gateway_kv_transfer_blocks_total", direction="received") == (
            received
        )
        assert metric(router.url, "gateway_disagg_prefills_total", where="local") == 1
        answer = httpx.post(router.url + "/v1/completions", json=long, timeout=60).json()
        assert answer["choices"][0]["text"] == alone(prefill, long)
        assert metric(router.url, "gateway_disagg_prefills_total", where="remote") == 1
        moved = metric(decode.url, "gateway_kv_transfer_blocks_total", direction="received")
        handed = answer["usage"]["prompt_tokens"] - 1  # every token but the last
        assert moved - received == -(-handed // 16)  # its blocks, the last partly filled
    finally:
        router.stop()


def test_n_choices_logprobs_and_seeded_sampling_keep_working(fleet):
    prefill, _, router = fleet
    body = completion(n=2, logprobs=2, temperature=0.8, seed=7, max_tokens=8)
    got = httpx.post(router.url + "/v1/completions", json=body, timeout=60).json()
    assert len(got["choices"]) == 2
    assert all(len(c["logprobs"]["tokens"]) == 8 for c in got["choices"])
    mine = httpx.post(prefill.url + "/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in mine["choices"]]


def test_the_prefill_answer_carries_kv_transfer_params(fleet):
    prefill, *_ = fleet
    body = completion(max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = httpx.post(prefill.url + "/v1/completions", json=body, timeout=60).json()[
        "kv_transfer_params"
    ]
    assert params["do_remote_prefill"] is True and params["remote_engine_id"] == "prefill"
    assert len(params["remote_block_ids"]) == 4  # 51 of the 52 tokens: 3 full blocks, 1 partial
    release = {"remote_request_id": params["remote_request_id"], "how": "cancelled"}
    assert httpx.post(prefill.url + "/v1/kv/release", json=release).json() == {"released": True}
    assert metric(prefill.url, "gateway_kv_blocks_used") == 0


def test_blocks_through_shared_memory(tmp_path, tiny_model_dir, fleet):
    """kv_transport=shm: the decode engine takes the blocks from a file of /dev/shm that the
    prefill engine wrote, not from the socket; the answer is the same, the blocks are counted
    as moved, and no file is left behind. A fetch asking for another way is refused."""
    prefill = fleet[0]
    decode = engine(tmp_path / "decode.log", tiny_model_dir, "shm", GATEWAY_KV_TRANSPORT="shm")
    router = router_for(tmp_path / "router.log", prefill, decode)
    try:
        before = set(os.listdir("/dev/shm"))
        sent = {v: metric(prefill.url, "gateway_kv_transfer_messages_total", via=v) for v in VIAS}
        prompt = PROMPT + " Through shared memory."
        answer = httpx.post(router.url + "/v1/completions", json=completion(prompt), timeout=60)
        assert answer.json()["choices"][0]["text"] == alone(prefill, completion(prompt))
        cached = answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        received = metric(decode.url, "gateway_kv_transfer_blocks_total", direction="received")
        prompt_tokens = answer.json()["usage"]["prompt_tokens"]
        assert cached == prompt_tokens - 1  # every block taken in, only the last token computed
        assert received == -(-cached // 16)
        after = {v: metric(prefill.url, "gateway_kv_transfer_messages_total", via=v) for v in VIAS}
        assert after == {"shm": sent["shm"] + 1, "http": sent["http"]}
        until(lambda: metric(prefill.url, "gateway_kv_leases_held") == 0)
        left = {f for f in set(os.listdir("/dev/shm")) - before if f.startswith("gateway-kv-")}
        assert not left
        bad = {"remote_request_id": "x", "via": "pigeon"}
        refused = httpx.post(prefill.url + "/v1/kv/fetch", json=bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "via"
    finally:
        router.stop()
        decode.stop()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_prefill_engine_gone_before_the_transfer(tmp_path, tiny_model_dir, fleet, policy):
    reference = fleet[0]
    prefill = engine(tmp_path / "prefill.log", tiny_model_dir, "gone")
    decode = engine(
        tmp_path / "decode.log", tiny_model_dir, "d", GATEWAY_KV_TRANSFER_FAILURE=policy
    )
    try:
        body = completion(max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        params = httpx.post(prefill.url + "/v1/completions", json=body, timeout=60).json()
        params = params["kv_transfer_params"] | {
            "remote_host": "127.0.0.1",
            "remote_port": prefill.port,
        }
        prefill.proc.kill()
        prefill.proc.wait()
        answer = httpx.post(
            decode.url + "/v1/completions", json=completion(kv_transfer_params=params), timeout=60
        )
        if policy == "recompute":
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["text"] == alone(reference, completion())
            assert answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        else:
            assert answer.status_code == 502
            assert "KV blocks could not be had" in answer.json()["error"]["message"]
        assert metric(decode.url, "gateway_kv_blocks_used") == 0
        # The release to the gone engine was refused too: logged, and the request unharmed.
        assert "KV lease cancelled not released" in decode.log()
    finally:
        prefill.stop()
        decode.stop()


def test_a_decode_engine_killed_mid_stream(tmp_path, tiny_model_dir, fleet):
    prefill = fleet[0]
    decode = engine(tmp_path / "decode.log", tiny_model_dir, "doomed")
    router = router_for(tmp_path / "router.log", prefill, decode)
    try:
        body = completion("Once upon a time", max_tokens=1000, stream=True)
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is decoding
            decode.proc.kill()
            decode.proc.wait()
            _, rest = streamed_text(lines)
        error = json.loads(rest[-1][len("data: ") :])["error"]
        assert error["code"] == "upstream_failed"
        until(lambda: httpx.get(router.url + "/health").status_code == 503)
        assert httpx.get(router.url + "/health/ready").status_code == 503
    finally:
        router.stop()
        decode.stop()


def test_the_router_starts_its_engines_and_takes_them_along(tmp_path, tiny_model_dir):
    router = ServerProcess(
        "step10_disaggregated",
        tmp_path / "router.log",
        {
            "GATEWAY_MODEL": str(tiny_model_dir),
            "GATEWAY_RESPONSE_CACHE": "false",
            "GATEWAY_LOCAL_PREFILL_CHARS": "0",
        },
    )
    try:
        pools = httpx.get(router.url + "/health").json()
        urls = ["http://" + name for role in ("prefill", "decode") for name in pools[role]]
        assert len(urls) == 2
        answer = httpx.post(router.url + "/v1/completions", json=completion(), timeout=60)
        assert answer.status_code == 200
        assert metric(urls[1], "gateway_kv_transfer_blocks_total", direction="received") == 4
        router.proc.kill()  # no chance to stop its engines itself
        router.proc.wait()
        for url in urls:  # no engine outlives its router
            until(lambda url=url: _refused(url), timeout=30)
    finally:
        router.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_prefill_engine_gone_at_the_router(tmp_path, tiny_model_dir, fleet, policy):
    reference, decode, _ = fleet
    prefill = engine(tmp_path / "prefill.log", tiny_model_dir, "short-lived")
    router = router_for(
        tmp_path / "router.log", prefill, decode, GATEWAY_KV_TRANSFER_FAILURE=policy
    )
    try:
        prefill.proc.kill()
        prefill.proc.wait()
        body = completion("A prompt nobody has prefilled " + PROMPT)
        answer = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        if policy == "recompute":
            assert answer.status_code == 200
            assert answer.json()["choices"][0]["text"] == alone(reference, body)
        else:
            assert answer.status_code == 502
            assert answer.json()["error"]["code"] == "prefill_failed"
    finally:
        router.stop()
        prefill.stop()


def test_the_router_page_shows_both_engines_by_role(fleet):
    """GET /debug/engine on step 10's router: one panel per engine, named by its pool, each
    relaying that engine's own live feed."""
    prefill, decode, router = fleet
    names = {
        "prefill": prefill.url.removeprefix("http://"),
        "decode": decode.url.removeprefix("http://"),
    }
    assert httpx.get(router.url + "/debug/engine", timeout=10).status_code == 200
    sources = httpx.get(router.url + "/debug/engine/sources", timeout=10).json()
    assert sorted(s["name"] for s in sources) == sorted(f"{r} {n}" for r, n in names.items())
    for source in sources:
        with httpx.stream("GET", router.url + "/debug/" + source["events"], timeout=10) as events:
            assert events.status_code == 200
            line = next(x for x in events.iter_lines() if x.startswith("data:"))
        assert json.loads(line.removeprefix("data:"))["counters"]["kv_blocks_total"] > 0
    unknown = httpx.get(router.url + "/debug/engine/events?replica=nowhere:1", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "no_such_replica"


def test_the_router_timeline_puts_both_engines_on_one_axis(tmp_path, fleet):
    """GET /debug/timeline on step 10's router, behind its key: one process per engine, named
    by its pool, on one time axis, so the prefill engine's span of a request ends "handed
    over" before the decode engine's span of it starts (with the blocks taken in as cached)."""
    prefill, decode, _ = fleet
    router = router_for(tmp_path / "router.log", prefill, decode, GATEWAY_API_KEY="k")
    key = {"authorization": "Bearer k"}
    try:
        body = completion("On one timeline: " + PROMPT, max_tokens=2)
        answer = httpx.post(router.url + "/v1/completions", json=body, headers=key, timeout=60)
        assert answer.status_code == 200
        assert httpx.get(router.url + "/debug/timeline", timeout=10).status_code == 401
        # the last 2 iterations of each engine: ours, and each trace counts from its own start
        trace = httpx.get(router.url + "/debug/timeline?last=2", headers=key, timeout=10).json()
    finally:
        router.stop()
    events = trace["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(names.values()) == sorted(
        f"{role} {server.url.removeprefix('http://')}"
        for role, server in (("prefill", prefill), ("decode", decode))
    )
    pid = {name.split()[0]: p for p, name in names.items()}
    assert trace["otherData"]["missing"] == {}
    handed = max(
        (e for e in events if e["pid"] == pid["prefill"] and e["name"] == "handed over"),
        key=lambda e: e["ts"],
    )
    taken = max(
        (e for e in events if e["pid"] == pid["decode"] and e["name"].startswith("prefill ")),
        key=lambda e: e["ts"],
    )
    assert taken["args"]["cached"] >= 48  # the blocks handed over
    decode_span = [e for e in events if e["pid"] == pid["decode"] and e["tid"] == taken["tid"]]
    assert handed["ts"] <= min(e["ts"] for e in decode_span if e["ph"] != "M")


def test_local_engines_get_the_prompt_budget_and_the_transport(monkeypatch):
    """decode_prefill_chunk and decode_speculative_tokens reach the decode engines only (the
    prefill engine keeps its whole budget for prompts); the prefill engine runs at
    prefill_nice, the decode engine at the router's niceness; both local engines move blocks
    through shared memory, unless asked otherwise or a pool is given by URL (it may be on
    another machine: http)."""
    from step10_disaggregated import replicas
    from step10_disaggregated.server import Config

    started: dict[str, dict] = {}
    before: dict[str, object] = {}

    class Recorded:
        def __init__(self, argv, env, preexec_fn):
            started[env["GATEWAY_ENGINE_ID"]] = env
            before[env["GATEWAY_ENGINE_ID"]] = preexec_fn

    popen = subprocess.Popen
    monkeypatch.setattr(replicas.subprocess, "Popen", Recorded)
    monkeypatch.delenv("GATEWAY_NUM_SPECULATIVE_TOKENS", raising=False)
    engines = replicas.LocalEngines(Config(decode_prefill_chunk=12, decode_speculative_tokens=2))
    engines.start("prefill"), engines.start("decode")
    chunk, drafts = "GATEWAY_PREFILL_CHUNK_WHILE_DECODING", "GATEWAY_NUM_SPECULATIVE_TOKENS"
    assert started["decode-0"][chunk] == "12" and chunk not in started["prefill-0"]
    assert started["decode-0"][drafts] == "2" and drafts not in started["prefill-0"]
    assert {e["GATEWAY_KV_TRANSPORT"] for e in started.values()} == {"shm"}

    def niceness(engine_id: str) -> int:
        probe = [sys.executable, "-c", "import os; print(os.nice(0))"]
        with popen(probe, preexec_fn=before[engine_id], stdout=subprocess.PIPE) as child:
            return int(child.communicate()[0])

    assert niceness("prefill-0") == min(19, os.nice(0) + 10)
    assert niceness("decode-0") == os.nice(0)
    started.clear()
    replicas.LocalEngines(Config(decode_prefill_chunk=0, kv_transport="http")).start("decode")
    assert chunk not in started["decode-0"]
    assert started["decode-0"]["GATEWAY_KV_TRANSPORT"] == "http"
    started.clear()
    remote = Config(prefill_upstreams="http://10.0.0.1:8000")
    replicas.LocalEngines(remote).start("decode")
    assert started["decode-0"]["GATEWAY_KV_TRANSPORT"] == "http"
