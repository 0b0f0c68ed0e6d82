"""The engine's timeline: a valid Chrome trace, counts that equal the engine's own, a bounded
ring, the endpoint behind the API key, and a picture drawn from a recorded trace."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from bench.timeline_chart import KINDS, draw, grid
from common.config import ServerConfig
from common.model import load_model
from common.timeline import Timeline, trace
from step7_real_kv.engine import EngineConfig, PagedEngine
from tests.conftest import tiny_client
from tests.engine_helpers import make_request

MODEL = "SmolLM2-135M-Instruct"
PHASES = {"X", "i", "C", "M"}


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def run_engine(tiny_lm, config: EngineConfig, prompts: list[list[int]], max_tokens: int):
    """Every prompt at once, stepped to the end; (engine, tokens the model ran, requests)."""
    engine = PagedEngine(tiny_lm, config)
    computed = 0
    forward = engine.runner.forward

    def counting(batch):
        nonlocal computed
        computed += batch.num_tokens
        return forward(batch)

    engine.runner.forward = counting

    async def go():
        requests = [make_request(tiny_lm, p, max_tokens) for p in prompts]
        for request in requests:
            await engine.submit(request)
        while engine.scheduler.has_work:
            await engine.step()
        return requests

    requests = asyncio.run(go())
    return engine, computed, requests


def validate(doc: dict) -> list[dict]:
    """The Trace Event Format's rules this trace keeps; returns its events."""
    events = doc["traceEvents"]
    for e in events:
        assert {"name", "ph", "pid", "tid", "ts"} <= set(e), e
        assert e["ph"] in PHASES and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
        if e["ph"] in ("M", "C"):
            assert isinstance(e["args"], dict) and e["args"], e
    iterations = [e for e in events if e["ph"] == "X" and e["name"].startswith("iteration ")]
    starts = [e["ts"] for e in iterations]
    assert starts == sorted(starts)
    for a, b in zip(iterations, iterations[1:], strict=False):
        assert a["ts"] + a["dur"] <= b["ts"] + 1, (a, b)  # one engine: iterations never overlap
    return events


def lifetimes(events: list[dict]) -> dict[int, tuple[float, float]]:
    """Each request track's life: from its first event (arrival) to its last instant (end)."""
    life: dict[int, list[float]] = {}
    for e in events:
        if e["pid"] == 2 and e["ph"] in ("X", "i"):
            end = e["ts"] + e.get("dur", 0)
            span = life.setdefault(e["tid"], [e["ts"], end])
            span[0], span[1] = min(span[0], e["ts"]), max(span[1], end)
    return {tid: (lo, hi) for tid, (lo, hi) in life.items()}


def test_a_step7_trace_is_valid_and_counts_what_the_engine_did(tiny_lm):
    prompts = [list(range(100 + 20 * i, 130 + 20 * i)) for i in range(4)]  # 30 tokens each
    config = EngineConfig(block_size=4, num_kv_blocks=24)  # too small for all: preemptions
    engine, computed, requests = run_engine(tiny_lm, config, prompts, 12)
    assert engine.timeline is not None
    iterations, spans = engine.timeline.snapshot()
    doc = trace(iterations, spans)
    events = validate(json.loads(json.dumps(doc)))  # and it is plain JSON
    assert engine.scheduler.num_preemptions > 0
    assert sum(it.num_tokens for it in iterations) == computed
    assert sum(len(it.preempted) for it in iterations) == engine.scheduler.num_preemptions
    finished = [rid for it in iterations for rid, _ in it.finished]
    assert sorted(finished) == sorted(r.trace_id for r in requests)
    instants = [e for e in events if e["ph"] == "i"]
    assert sum(e["name"] == "preempted" for e in instants) == engine.scheduler.num_preemptions
    assert sum(e["name"] == "length" for e in instants) == len(requests)
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    for tid, (lo, hi) in lifetimes(events).items():  # every slice inside its request's life
        if tid == 0:
            continue
        end = next(e["ts"] for e in instants if e["tid"] == tid and e["name"] == "length")
        assert hi <= end + 1 and names[tid] in spans, (tid, hi, end)
        queued = [e for e in events if e["tid"] == tid and e["name"] == "queued"]
        assert not queued or queued[0]["ts"] == lo
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert counters == {"running", "waiting", "kv blocks"}
    slices = [e for e in events if e["name"].startswith("iteration ")]
    assert all(e["args"]["cpu_ms"] > 0 for e in slices)  # what each cost, beside how long


def test_the_ring_holds_at_most_its_size(tiny_lm):
    config = EngineConfig(block_size=4, num_kv_blocks=64, timeline_iterations=5)
    engine, _, _ = run_engine(tiny_lm, config, [list(range(200, 220))], 20)
    assert engine.timeline is not None
    numbers = [it.number for it in engine.timeline.iterations]
    assert len(numbers) == 5 and numbers == list(range(numbers[0], numbers[0] + 5))
    assert numbers[-1] >= 20  # about 20 iterations happened; the first ones fell off


def test_the_timeline_can_be_switched_off(tiny_lm):
    engine, _, _ = run_engine(tiny_lm, EngineConfig(timeline=False), [[5, 6, 7]], 3)
    assert engine.timeline is None


def test_an_empty_timeline_is_a_valid_trace():
    iterations, spans = Timeline(4).snapshot()
    validate(trace(iterations, spans))


def post_concurrently(client, count: int, max_tokens: int) -> None:
    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"row {i} of the batch", "max_tokens": max_tokens + i}
        assert client.post("/v1/completions", json={**body, "temperature": 0}).status_code == 200

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_step3_records_its_static_batches_padding_and_all(tiny_model_dir):
    with tiny_client("step3_batching", tiny_model_dir, max_wait_ms=300) as client:
        post_concurrently(client, 4, 3)
        response = client.get("/debug/timeline")
        assert response.status_code == 200
        doc = response.json()
        engine = client.app.state.serving.engine
        assert len(engine.timeline.iterations) >= 4
    events = validate(doc)
    kinds = {e["args"]["kind"] for e in events if e["pid"] == 2 and e["ph"] == "X" and
             "kind" in e["args"]}  # fmt: skip
    assert {"prefill", "decode", "padding"} <= kinds  # 3 to 6 tokens: rows finish early


def test_the_endpoint_wants_the_key_when_one_is_set(tiny_model_dir):
    with tiny_client("step7_real_kv", tiny_model_dir, api_key="s3cret") as client:
        assert client.get("/debug/timeline").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/debug/timeline", headers=auth).status_code == 200
        assert client.get("/debug/timeline?last=x", headers=auth).status_code == 400
    with tiny_client("step1_central_loader", tiny_model_dir) as client:  # no timeline there
        assert client.get("/debug/timeline").json()["error"]["code"] == "no_timeline"


def test_the_picture_is_drawn_from_a_recorded_trace(tiny_lm, tmp_path):
    prompts = [list(range(300 + 20 * i, 330 + 20 * i)) for i in range(4)]
    engine, _, _ = run_engine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=24), prompts, 12)
    assert engine.timeline is not None
    doc = trace(*engine.timeline.snapshot())
    cells, args, preempted, names = grid(doc)
    assert cells.shape == (4, len(engine.timeline.iterations)) and len(names) == 4
    drawn = {KINDS[k] for k in set(cells.flatten().tolist())}
    assert {"prefill", "decode"} <= drawn and preempted
    assert len(preempted) == engine.scheduler.num_preemptions
    out = tmp_path / "schedule.png"
    draw(doc, out, title="a test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_a_merged_trace_of_two_engines_is_drawn_one_engine_at_a_time(tiny_lm, tmp_path):
    """Step 10's router merges its engines' traces; the bench's chart splits them back, each
    engine's grid the same as from its own trace."""
    from bench.timeline_chart import engine_traces
    from step10_disaggregated.timelines import merge

    docs = {}
    for name, base in (("prefill a:1", 300), ("decode b:2", 500)):
        prompts = [list(range(base + 20 * i, base + 30 + 20 * i)) for i in range(3)]
        engine, _, _ = run_engine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=24), prompts, 6)
        assert engine.timeline is not None
        docs[name] = json.loads(json.dumps(trace(*engine.timeline.snapshot())))
    split = engine_traces(merge(docs))
    assert list(split) == list(docs)
    for name, doc in docs.items():
        cells, args, preempted, names = grid(split[name])
        want = grid(doc)
        assert (cells == want[0]).all() and args == want[1] and names == want[3]
        draw(split[name], tmp_path / "engine.png")
    assert engine_traces(docs["decode b:2"]) == {"": docs["decode b:2"]}


def test_iterations_by_rows_read_the_engines_own_forward_passes(tiny_lm, tmp_path, capsys):
    """bench.iterations: one entry per forward pass, its rows the tokens the model ran; the
    table counts them by rows; a merged trace gives the engine asked for by its name's prefix;
    a gzipped trace reads the same and the chart is drawn."""
    import gzip

    from bench import iterations
    from step10_disaggregated.timelines import merge

    engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=24))
    ran: list[int] = []
    forward = engine.runner.forward

    def counting(batch):
        ran.append(batch.num_tokens)
        return forward(batch)

    engine.runner.forward = counting

    async def go():
        for i in range(3):
            await engine.submit(make_request(tiny_lm, list(range(40 + 15 * i, 52 + 15 * i)), 5))
        while engine.scheduler.has_work:
            await engine.step()

    asyncio.run(go())
    assert engine.timeline is not None
    doc = json.loads(json.dumps(trace(*engine.timeline.snapshot())))
    its = iterations.iterations(doc)
    assert [i["rows"] for i in its] == ran
    table = iterations.by_rows(its)
    assert sum(t["n"] for t in table) == len(ran)
    assert {t["rows"]: t["n"] for t in table} == {r: ran.count(r) for r in set(ran)}

    other = {"traceEvents": [], "otherData": {"origin_s": doc["otherData"]["origin_s"]}}
    name, picked = iterations.engine(merge({"prefill a:1": other, "decode b:2": doc}), "decode")
    assert name == "decode b:2" and [i["rows"] for i in iterations.iterations(picked)] == ran
    path = tmp_path / "trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    assert iterations.main([str(path), str(tmp_path / "rows.png")]) == 0
    assert f"{len(ran)} iterations" in capsys.readouterr().out
    assert (tmp_path / "rows.png").read_bytes()[:4] == b"\x89PNG"
