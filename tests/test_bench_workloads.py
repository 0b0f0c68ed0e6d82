"""The bench's generated workloads: decode-bound, long-prompt and mixed.

Prompts never repeat and share no KV block, documents land in 1,000-2,000 tokens by the real
tokenizer, the classes split the users, the records and summaries carry prompt tokens, finish
reasons and the longest token gap, the table shows them per class, and a floor can be scoped to
a workload. One load generator runs against a stub server that records what it was sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench import floors, generate, publish, report
from bench.records import Record, parse_stream
from bench.stats import summarise, summarise_classes
from bench.workload import (
    DEFAULT_WORKLOAD,
    Workload,
    chat_body,
    load_workload,
    resolve_workload,
    workload_name,
)

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16  # tokens per KV block in step 7's pool: a shared prefix shorter than this caches nothing


def workload(name: str) -> Workload:
    return load_workload(resolve_workload(name))


def prompt_ids(tokenizer, work: Workload, prompt) -> list[int]:
    text = tokenizer.apply_chat_template(
        work.messages(prompt), tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


# ---------------------------------------------------------------- the files and the names


def test_names_resolve_to_the_workload_files_and_unknown_names_are_refused():
    assert resolve_workload("default") == DEFAULT_WORKLOAD
    for name in ("grounded", "decode", "long", "mixed"):
        path = resolve_workload(name)
        assert path.name == f"workload_{name}.json" and workload_name(path) == name
    with pytest.raises(ValueError, match="decode, default, grounded, long, mixed"):
        resolve_workload("decoded")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--workload", "nope"], cwd=ROOT, capture_output=True
    )
    assert done.returncode == 2 and b"no workload 'nope'" in done.stderr


def test_each_generated_workload_pins_its_classes():
    decode, long, mixed = workload("decode"), workload("long"), workload("mixed")
    (story,) = decode.classes
    assert (story.prompt, story.users, story.max_tokens) == ("story", "level", 128)
    (document,) = long.classes
    assert document.prompt_tokens == (1000, 2000) and document.max_tokens == 4
    assert [(c.name, c.users) for c in mixed.classes] == [("long", 2), ("stream", "level")]
    assert (decode.extra_users, long.extra_users, mixed.extra_users) == (0, 0, 2)
    # The first users of a level are the fixed-size class's, the rest stream.
    users = [mixed.class_of_user(i) for i in range(5)]
    assert [c.name if c else None for c in users] == ["long"] * 2 + ["stream"] * 3
    assert load_workload(DEFAULT_WORKLOAD).class_of_user(0) is None
    # The check prompts are workload.json's, so its reference answers check these runs too.
    default = load_workload(DEFAULT_WORKLOAD)
    for work in (decode, long, mixed):
        assert work.check_prompts == default.check_prompts
        assert work.system_prompt == default.system_prompt


# ---------------------------------------------------------------- the prompts


def test_generated_prompts_are_deterministic_and_never_repeat():
    work = workload("mixed")
    long, stream = work.classes
    again = load_workload(resolve_workload("mixed"))
    assert work.prompt_for(stream, 7, "c16") == again.prompt_for(stream, 7, "c16")
    prompts = [work.prompt_for(c, n, salt) for c in (long, stream) for n in range(40)
               for salt in ("c1", "c16", "warmup")]  # fmt: skip
    texts = {(p.system, p.user) for p in prompts}
    assert len(texts) == len(prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    round_robin = load_workload(DEFAULT_WORKLOAD)
    assert round_robin.prompt_for(None, 9, "c1") == round_robin.prompts[9 % 8]


def test_every_word_of_a_document_is_one_token(tokenizer):
    words = {*generate.NOUNS, *generate.ADJECTIVES, *generate.VERBS, *generate.PREPOSITIONS}
    for word in (*words, "the", "The"):
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_documents_fill_1000_to_2000_prompt_tokens_and_share_no_block(tokenizer):
    work = workload("long")
    (document,) = work.classes
    lengths, ids = [], []
    for number, salt in [(n, s) for n in range(12) for s in ("c1", "c64", "warmup")]:
        tokens = prompt_ids(tokenizer, work, work.prompt_for(document, number * 997, salt))
        lengths.append(len(tokens))
        ids.append(tokens)
    assert min(lengths) >= 1000 and max(lengths) <= 2000
    assert max(lengths) - min(lengths) > 500  # drawn across the range, not one length
    longest_shared = max(common_prefix(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    assert longest_shared < BLOCK


def test_story_prompts_share_no_block_and_ask_for_long_answers(tokenizer):
    work = workload("decode")
    (story,) = work.classes
    ids = [prompt_ids(tokenizer, work, work.prompt_for(story, n, "c4")) for n in range(30)]
    longest_shared = max(common_prefix(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    assert longest_shared < BLOCK
    body = chat_body(work, work.prompt_for(story, 3, "c4"), "m", 128, stream=True)
    system, user = body["messages"]
    assert system["content"].startswith("Request c4-3. ") and "long story" in user["content"]


# ---------------------------------------------------------------- records, summaries, table


def sse(payload) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload))


def stream_lines(times: list[float], finish: str, prompt_tokens: int) -> list[tuple[float, str]]:
    chunks = [{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}]
    lines = [(t, sse(chunks[0])) for t in times]
    done = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    usage = {"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                      "completion_tokens": len(times)}}  # fmt: skip
    end = times[-1]
    return [*lines, (end, sse(done)), (end, sse(usage)), (end, sse("[DONE]"))]


def record(kind: str, times: list[float], finish: str, prompt_tokens: int, start=0.0) -> Record:
    rec = Record(0, 0, "p", start, 200, request_class=kind)
    rec = parse_stream(rec, stream_lines(times, finish, prompt_tokens), sent_at=0.0)
    rec.e2e_s = times[-1]
    return rec


def test_records_keep_prompt_tokens_and_finish_reason():
    rec = record("stream", [0.5, 0.6, 1.6], "length", 1234)
    assert (rec.prompt_tokens, rec.finish_reason, rec.output_tokens) == (1234, "length", 3)
    assert rec.itl_s == pytest.approx([0.1, 1.0])
    assert Record.from_dict(json.loads(rec.to_json())) == rec
    old = json.loads(rec.to_json())  # a record written before these fields existed still reads
    for key in ("prompt_tokens", "finish_reason", "request_class"):
        del old[key]
    assert Record.from_dict(old).prompt_tokens == 0


def level_records() -> list[Record]:
    return [
        record("stream", [0.1, 0.2, 0.3, 1.8], "length", 60),  # a 1.5 s freeze
        record("stream", [0.1, 0.15, 0.2, 0.25], "stop", 60),
        record("long", [2.0], "length", 1500),
        record("long", [4.0], "length", 1700),
    ]


def test_summaries_give_the_longest_gap_prompt_rate_and_early_stops_per_class():
    records = level_records()
    whole = summarise(records)
    assert whole["itl_max_s"] == pytest.approx(1.5)
    assert whole["prompt_tokens"] == 60 + 60 + 1500 + 1700
    assert whole["prompt_tok_s"] == pytest.approx(3320 / 4.0)  # window: first send to last byte
    assert whole["stopped_early"] == 1
    classes = summarise_classes(records)
    assert sorted(classes) == ["long", "stream"]
    assert classes["long"]["ttft_p50_s"] == pytest.approx(3.0)
    assert classes["long"]["itl_max_s"] is None  # one token each: no gap
    assert classes["long"]["prompt_tokens_p50"] == 1600
    assert classes["stream"]["itl_max_s"] == pytest.approx(1.5)
    assert classes["stream"]["itl_p50_s"] == pytest.approx(0.075)  # .05 .05 .05 | .1 .1 1.5
    assert summarise_classes([Record(0, 0, "p", 0.0, 200)]) == {}


def results_with(level: dict, workload_meta: dict) -> dict:
    return {
        "meta": {
            "commit": "abc",
            "workload": workload_meta,
            "machine": {"cpu_model": "cpu", "cores": 2, "memory_gb": 1, "device": "cpu"},
            "versions": {"torch": "t", "transformers": "t", "locust": "l"},
        },
        "config": {
            "dtype": "float32",
            "profile": {
                "name": "quick",
                "max_tokens": 32,
                "run_time_s": 15,
                "stop_timeout_s": 15,
                "max_requests": 200,
            },
        },  # fmt: skip
        "steps": [{"step": "step7_real_kv", "status": "ok", "message": None, "levels": [level]}],
    }


def test_the_table_shows_each_class_with_its_gaps_and_the_workload():
    records = level_records()
    level = {"concurrency": 4, "users": 4, "extra_users": 2, "partial": False, "peak_rss_mb": 1,
             "foreign_cpu": 0.0, "summary": summarise(records),
             "classes": summarise_classes(records)}  # fmt: skip
    work = load_workload(resolve_workload("mixed"))
    meta = {"name": "mixed", "version": 1, "classes": [
        {"name": c.name, "users": c.users, "prompt": c.prompt, "max_tokens": c.max_tokens,
         "prompt_tokens": c.prompt_tokens} for c in work.classes]}  # fmt: skip
    table = report.markdown(results_with(level, meta))
    assert "Workload **mixed** (version 1), every prompt new: long: 2 more users" in table
    assert "documents of 1,000-2,000 prompt tokens" in table
    rows = {line.split("|")[3].strip(): line for line in table.splitlines()
            if line.startswith("| step7_real_kv | 4 (+2) |")}  # fmt: skip
    assert sorted(rows) == ["long", "stream"]
    cells = [c.strip() for c in rows["stream"].split("|")[1:-1]]
    assert cells[report.TOKEN_COLUMNS.index("ITL max ms")] == "1500"
    assert cells[report.TOKEN_COLUMNS.index("stopped early")] == "1"
    cells = [c.strip() for c in rows["long"].split("|")[1:-1]]
    assert cells[report.TOKEN_COLUMNS.index("prompt tokens p50")] == "1600"
    # Without classes, one 'all' row per level; the main table is unchanged.
    del level["classes"]
    plain = report.markdown(results_with(level, {"version": 1}))
    assert "| step7_real_kv | 4 (+2) | all |" in plain
    assert "Workload **default** (version 1): its prompts round-robin" in plain
    assert report.table_row(report.COLUMNS) in plain


# ---------------------------------------------------------------- floors by workload


def test_a_floor_on_a_workload_is_checked_on_its_runs_and_skipped_on_others():
    def run(name: str | None) -> dict:
        steps = []
        for step, tpot in (("step7_real_kv", 0.016), ("step8_speculative", 0.007)):
            levels = [{"concurrency": 1, "partial": False, "summary": {"tpot_p50_s": tpot}}]
            steps.append({"step": step, "status": "ok", "message": None, "levels": levels})
        meta = {"workload": {"name": name}} if name else {}
        config = {} if name else {"workload_path": "/x/bench/workload_grounded.json"}
        return {"meta": meta, "config": config, "steps": steps}

    key = "step7_real_kv/step8_speculative tpot_p50_s at concurrency 1 on grounded"
    (on_grounded,) = floors.check_floors(run("grounded"), {key: 1.4})
    assert on_grounded.outcome == "pass" and on_grounded.message.startswith("2.29")
    (too_high,) = floors.check_floors(run("grounded"), {key: 3})
    assert too_high.outcome == "fail"
    (elsewhere,) = floors.check_floors(run("default"), {key: 1.4})
    assert elsewhere.outcome == "skip" and "default workload" in elsewhere.message
    (from_path,) = floors.check_floors(run(None), {key: 1.4})  # older runs: the file's name
    assert from_path.outcome == "pass"
    unscoped = key.removesuffix(" on grounded")
    assert floors.check_floors(run("default"), {unscoped: 1.4})[0].outcome == "pass"


def test_the_committed_floors_parse_and_gate_steps_8_and_9():
    committed = json.loads((ROOT / "bench" / "floors.json").read_text())
    assert all(floors._KEY.match(key) for key in committed)
    steps = {m["a"] for key in committed if (m := floors._KEY.match(key))}
    steps |= {m["b"] for key in committed if (m := floors._KEY.match(key))}
    assert {"step8_speculative", "step9_router"} <= steps


# ---------------------------------------------------------------- the load generator


class Recorder(BaseHTTPRequestHandler):
    """A stub OpenAI server: streams three tokens and remembers every body it was sent."""

    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        times = [0.0, 0.0, 0.0]
        for _, line in stream_lines(times, "length", len(json.dumps(body)) // 4):
            self.wfile.write(line.encode() + b"\n\n")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub_server():
    Recorder.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_mixed_level_runs_both_classes_with_their_own_lengths(stub_server, tmp_path):
    records_file = tmp_path / "records.jsonl"
    args = ["--host", stub_server, "--users", "5", "--run-time", "1.5", "--stop-timeout", "5",
            "--max-tokens", "32", "--max-requests", "60", "--records", str(records_file),
            "--workload", str(resolve_workload("mixed")), "--salt", "c3"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "bench.loadgen", *args], cwd=ROOT, check=True,
                   timeout=60)  # fmt: skip
    bodies = Recorder.bodies
    assert len(bodies) == 60
    by_length = {body["max_tokens"] for body in bodies}
    assert by_length == {4, 256}  # each class's pinned length, never the profile's 32
    long = [b for b in bodies if b["max_tokens"] == 4]
    assert all(len(b["messages"][1]["content"]) > 4000 for b in long)
    assert all(b["messages"][0]["content"].startswith("Request c3-") for b in bodies)
    texts = [b["messages"][1]["content"] for b in bodies]
    assert len(set(texts)) == len(texts)  # every request a new prompt
    records = [Record.from_dict(json.loads(line)) for line in records_file.read_text().splitlines()]
    assert {r.request_class for r in records} == {"long", "stream"}
    assert all(r.ok and r.prompt_tokens > 0 and r.finish_reason == "length" for r in records)


def test_a_workload_run_is_published_beside_the_default_one(tmp_path):
    records = level_records()
    level = {"concurrency": 4, "users": 4, "extra_users": 2, "partial": False, "peak_rss_mb": 1,
             "foreign_cpu": 0.0, "summary": summarise(records),
             "classes": summarise_classes(records)}  # fmt: skip
    results = results_with(level, {"name": "mixed", "version": 1, "classes": []})
    run = tmp_path / "run"
    run.mkdir()
    report.write_json(results, run)
    (run / "table.md").write_text(report.markdown(results))
    root = tmp_path / "repo"
    (root / "step7_real_kv").mkdir(parents=True)
    (root / "README.md").write_text("# Project\n\n<!-- bench:quick:start -->\nkept\n"
                                    "<!-- bench:quick:end -->\n")  # fmt: skip
    (root / "step7_real_kv" / "README.md").write_text("# Step 7\n")
    assert publish.published_name(results) == "quick-mixed"
    publish.publish(run, root=root)
    assert (root / "bench" / "charts" / "quick-mixed" / "table.md").exists()
    top = (root / "README.md").read_text()
    assert "kept" in top and top.count("<!-- bench:quick-mixed:start -->") == 1
    step = (root / "step7_real_kv" / "README.md").read_text()
    assert "## Bench (quick profile, mixed workload)" in step
    assert "(../bench/charts/quick-mixed/throughput.png)" in step


def test_a_level_run_beside_another_job_is_marked_in_its_row_and_in_the_published_table(
    tmp_path,
):
    """A level whose 'other CPU' passed the busy share says so in its own row, and publish
    writes the table from the results, so the published copy says it even when the run's own
    table.md predates the note."""
    records = level_records()
    busy = {"concurrency": 4, "users": 4, "extra_users": 2, "partial": False, "peak_rss_mb": 1,
            "foreign_cpu": 0.39, "summary": summarise(records),
            "classes": summarise_classes(records)}  # fmt: skip
    workload = {"name": "mixed", "version": 1, "classes": []}
    results = results_with(busy, workload)
    assert "other processes used 39% of the CPU: not comparable" in report.markdown(results)
    quiet = results_with({**busy, "foreign_cpu": 0.01}, workload)
    assert "not comparable" not in report.markdown(quiet)
    run = tmp_path / "run"
    run.mkdir()
    report.write_json(results, run)
    (run / "table.md").write_text("an older table\n")
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text("# Project\n")
    publish.publish(run, root=root)
    published = (root / "bench" / "charts" / "quick-mixed" / "table.md").read_text()
    assert "not comparable" in published and "an older table" not in published
