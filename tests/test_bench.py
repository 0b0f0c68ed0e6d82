"""The bench harness: its maths on known inputs, then short real runs against step 1.

The integration tests run `python -m bench` as a child process, exactly as a user would, with
tiny bounds (a few seconds per level, max_tokens 8), and read back what it wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import bytes_chart, floors, history, machine, report
from bench.profiles import plan_levels
from bench.publish import publish
from bench.records import Record, backoff_delay, parse_stream, retry_after_seconds
from bench.servers import discover_steps, select_steps
from bench.stats import percentile, summarise

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_RUN = ["--levels", "1,2", "--run-time", "3", "--stop-timeout", "30", "--max-tokens", "8"]


# ---------------------------------------------------------------- percentiles and parsing


def test_percentile_interpolates_between_ranks():
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(range(1, 11), 50) == 5.5
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def sse(payload) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload))


def chat_chunk(content: str | None, finish: str | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_parse_stream_times_text_chunks_and_reads_usage():
    lines = [
        (0.5, sse(chat_chunk(""))),  # the role chunk: no text yet, so not the first token
        (0.5, ""),
        (1.0, sse(chat_chunk("Hel"))),
        (1.2, sse(chat_chunk("lo"))),
        (1.5, sse(chat_chunk(" you"))),
        (1.6, sse(chat_chunk(None, "length"))),
        (1.6, sse({"choices": [], "usage": {"completion_tokens": 5}})),
        (1.6, sse("[DONE]")),
    ]
    record = parse_stream(Record(0, 0, "p", 0.0, 200), lines, sent_at=0.0)
    record.e2e_s = 2.0
    assert record.ok and record.error is None
    assert record.ttft_s == 1.0
    assert record.itl_s == pytest.approx([0.2, 0.3])
    assert record.output_tokens == 5  # from usage, though only three chunks carried text
    assert record.tpot_s == pytest.approx((2.0 - 1.0) / 4)


def test_parse_stream_reports_in_band_errors_and_cut_streams():
    failed = [(1.0, sse(chat_chunk("a"))), (1.1, sse({"error": {"message": "generation failed"}}))]
    record = parse_stream(Record(0, 0, "p", 0.0, 200), failed, sent_at=0.0)
    assert record.error == "generation failed" and not record.ok
    cut = [(1.0, sse(chat_chunk("a"))), (1.2, sse(chat_chunk("b")))]
    record = parse_stream(Record(0, 0, "p", 0.0, 200), cut, sent_at=0.0)
    assert record.error == "stream ended before [DONE] or a finish_reason"
    assert record.output_tokens == 2  # no usage chunk: one per text chunk
    # transformers serve ends after the finish_reason chunk, without [DONE]: a whole answer.
    ended = [*cut, (1.3, sse(chat_chunk(None, "stop")))]
    assert parse_stream(Record(0, 0, "p", 0.0, 200), ended, sent_at=0.0).ok


def test_backoff_honours_retry_after_doubles_and_caps():
    assert backoff_delay(0, retry_after=2.0) == 2.0
    assert backoff_delay(3, retry_after=0.0, base=0.5) == 4.0
    assert backoff_delay(10, retry_after=1.0, cap=8.0) == 8.0
    assert backoff_delay(0, retry_after=60.0, cap=8.0) == 8.0
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after_seconds(None) is None


def ok_record(rid: int, start: float, e2e: float, ttft: float, tokens: int, attempt=0) -> Record:
    return Record(rid, attempt, "p", start, 200, e2e, ttft, [0.1] * (tokens - 1), tokens)


def test_summarise_counts_retries_rejections_errors_and_throughput():
    records = [
        ok_record(0, start=100.0, e2e=2.0, ttft=0.5, tokens=10),
        Record(1, 0, "p", 100.5, 429, e2e_s=0.1, retry_after_s=1.0, error="HTTP 429"),
        ok_record(1, start=101.6, e2e=2.4, ttft=0.9, tokens=8, attempt=1),
        Record(2, 0, "p", 101.0, 500, e2e_s=0.2, error="HTTP 500"),
        Record(3, 0, "p", 102.0, 0, error="cut off when the level ended", cut_off=True),
    ]
    s = summarise(records)
    assert (s["requests"], s["completed"], s["retries"], s["cut_off"]) == (3, 2, 1, 1)
    assert s["statuses"] == {"200": 2, "429": 1, "500": 1}
    assert s["errors"] == 1 and s["error_rate"] == pytest.approx(1 / 3)
    assert s["rejections"] == 1 and s["rejection_rate"] == pytest.approx(1 / 3)
    assert s["window_s"] == pytest.approx(104.0 - 100.0)  # first send to last byte
    assert s["output_tok_s"] == pytest.approx(18 / 4.0)
    assert s["req_per_s"] == pytest.approx(2 / 4.0)
    assert s["ttft_p50_s"] == pytest.approx(0.7)
    assert s["e2e_p99_s"] == pytest.approx(2.0 + 0.4 * 0.99)
    assert s["tpot_p50_s"] == pytest.approx(((1.5 / 9) + (1.5 / 7)) / 2)


def test_summarise_of_nothing_has_no_rates():
    s = summarise([])
    assert s["requests"] == 0 and s["output_tok_s"] is None and s["error_rate"] is None


def test_levels_above_a_cap_run_once_at_the_cap():
    assert plan_levels((1, 4, 16, 64), cap=4) == [(1, 1), (4, 4)]
    assert plan_levels((1, 8), cap=4) == [(1, 1), (8, 4)]
    assert plan_levels((1, 8), cap=None) == [(1, 1), (8, 8)]


def test_steps_are_discovered_in_order_and_selected_by_number_or_name():
    steps = discover_steps(ROOT)
    assert steps[:2] == ["step0_bruteforce", "step1_central_loader"]
    assert select_steps(steps, "1,0") == ["step0_bruteforce", "step1_central_loader"]
    assert select_steps(steps, "step1_central_loader") == ["step1_central_loader"]
    # the row label is the folder: the router's rows read step9_router, as its README names it
    assert select_steps(steps, "9") == ["step9_router"]
    with pytest.raises(SystemExit):
        select_steps(steps, "99")


# ---------------------------------------------------------------- floors and history


def fake_results(step_values: dict[str, float | None], status: dict | None = None) -> dict:
    def entry(step: str, value: float | None) -> dict:
        state = (status or {}).get(step, "ok")
        levels = [
            {"concurrency": c, "users": c, "partial": False, "summary": {"output_tok_s": v}}
            for c, v in ((1, 1.0), (8, value))
        ]
        return {"step": step, "status": state, "message": state, "levels": levels}

    return {
        "meta": {
            "commit": "abc1234def",
            "dirty": False,
            "finished_at": "now",
            "workload": {"sha256": "x"},
            "machine": {"machine_class": "amd-zen5-avx512-2c", "cpu_model": "cpu", "cores": 2},
        },
        "config": {"profile": {"name": "quick"}, "dtype": "float32"},
        "steps": [entry(step, value) for step, value in step_values.items()],
    }


def test_floor_check_passes_fails_and_skips(tmp_path):
    results = fake_results({"stepA_x": 30.0, "stepB_y": 10.0})
    floor_map = {
        "stepA_x/stepB_y output_tok_s at max concurrency": 2.0,  # 3.0: pass
        "stepA_x/stepB_y output_tok_s at concurrency 8": 4.0,  # 3.0: fail
        "stepC_z/stepB_y output_tok_s at max concurrency": 2.0,  # absent: skip
    }
    verdicts = [v.outcome for v in floors.check_floors(results, floor_map)]
    assert verdicts == ["pass", "fail", "skip"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    floors_file = tmp_path / "floors.json"
    floors_file.write_text(json.dumps(dict(list(floor_map.items())[::2])))
    assert floors.run_check(tmp_path, floors_file) == 0
    floors_file.write_text(json.dumps(floor_map))
    cli = [sys.executable, "-m", "bench", "check", "--results", str(tmp_path)]
    done = subprocess.run([*cli, "--floors", str(floors_file)], cwd=ROOT, capture_output=True)
    assert done.returncode == 1, done.stdout.decode()
    assert b"FAIL" in done.stdout and b"SKIP" in done.stdout


def test_a_refused_step_fails_its_floor():
    results = fake_results({"stepA_x": None, "stepB_y": 10.0}, status={"stepA_x": "refused"})
    (verdict,) = floors.check_floors(
        results, {"stepA_x/stepB_y output_tok_s at max concurrency": 1}
    )
    assert verdict.outcome == "fail" and "refused" in verdict.message


def test_the_table_names_the_reference_file_as_the_repository_does():
    """A run made from another checkout names its reference by that checkout's absolute path;
    the table, which is committed, says where the file is in the repository."""
    results = json.loads((ROOT / "bench" / "charts" / "full-decode" / "results.json").read_text())
    results["reference"]["source"] = "/home/someone/gateway/bench/charts/full/results.json"
    table = report.markdown(results)
    assert "checked against bench/charts/full/results.json before timing" in table
    assert "/home/someone" not in table
    results["reference"]["source"] = "answers.json"
    assert "checked against answers.json before timing" in report.markdown(results)


def test_history_appends_a_line_and_charts_it(tmp_path):
    file = tmp_path / "history.jsonl"
    for value in (10.0, 12.0):
        (tmp_path / "results.json").write_text(json.dumps(fake_results({"step1_x": value})))
        history.append(tmp_path, file)
    runs = history.read(file)
    assert [r["steps"]["step1_x"]["levels"]["8"]["output_tok_s"] for r in runs] == [10.0, 12.0]
    png = history.chart(runs, tmp_path / "history.png")
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_tokens_per_verification_counts_the_models_own_token():
    """One meaning everywhere: drafted tokens kept per verification, plus the one token every
    verification yields (step 8's README reads the same figure)."""
    spec = {"drafted": 100.0, "accepted": 62.0, "verifications": 20.0}
    level = {"partial": False, "summary": {"cut_off": 0, "completed": 5}, "speculation": spec}
    assert report._note(level) == "drafts: 62% of 100 accepted, 4.10 tokens per verification"
    notes = report._footnotes({"steps": [{"step": "step8_x", "levels": [level]}]})
    assert any("accepted / verifications + 1" in note for note in notes)


def test_the_history_chart_draws_one_machine_class(tmp_path, monkeypatch):
    lines = [
        {"profile": "quick", "machine_class": cls, "commit": c, "dirty": False, "steps": {}}
        for cls, c in (("amd-zen3-avx2-2c", "a" * 7), ("amd-zen5-avx512-2c", "b" * 7))
    ]
    drawn: list[list[dict]] = []
    monkeypatch.setattr(history, "_series", lambda runs, step: drawn.append(runs) or ([], []))
    lines[0]["steps"] = lines[1]["steps"] = {"step1_x": {"levels": {}}}
    history.chart(lines, tmp_path / "history.png")
    assert drawn == [[lines[1]]]  # the newest line's class only
    history.chart(lines, tmp_path / "history.png", machine_class="amd-zen3-avx2-2c")
    assert drawn[-1] == [lines[0]]
    lines[1]["machine_class"] = "unknown"  # lines of unknown class are never drawn together
    with pytest.raises(SystemExit, match="unknown machine class"):
        history.chart(lines, tmp_path / "history.png")


# ---------------------------------------------------------------- real runs


def run_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def step1_run(tmp_path_factory, real_model_dir) -> Path:
    """One short real run of the harness against step 1, shared by the tests below."""
    results = tmp_path_factory.mktemp("bench") / "run"
    done = run_bench("--steps", "1", *TINY_RUN, "--max-requests", "6", "--results", str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    return results


@pytest.mark.integration
def test_a_real_run_writes_json_table_and_charts(step1_run):
    results = json.loads((step1_run / "results.json").read_text())
    meta = results["meta"]
    assert len(meta["commit"]) == 40 and isinstance(meta["dirty"], bool)
    assert meta["machine"]["cores"] >= 1 and meta["versions"]["locust"]
    assert meta["machine"]["read_gbps"] > 0.5  # any machine this runs on reads faster
    assert meta["machine"]["machine_class"] == machine.this_machine()
    assert results["config"]["profile"]["levels"] == [1, 2]
    (step,) = results["steps"]
    assert step["status"] == "ok" and step["check"]["is_reference"]
    assert set(results["reference"]["answers"]) == {"check-capital", "check-library", "check-sky"}
    assert [lv["concurrency"] for lv in step["levels"]] == [1, 2]
    for level in step["levels"]:
        s = level["summary"]
        assert not level["partial"] and s["completed"] >= 1 and s["errors"] == 0
        assert 0 < s["ttft_p50_s"] <= s["e2e_p50_s"] and s["output_tok_s"] > 0
        assert s["output_tokens"] <= 8 * s["completed"]
        assert level["peak_rss_mb"] > 100  # the model alone is ~540 MB in float32
        assert 0 <= level["foreign_cpu"] <= 1
        lines = (step1_run / level["records_file"]).read_text().splitlines()
        assert len(lines) >= s["completed"]
    table = (step1_run / "table.md").read_text()
    assert f"(read at {meta['machine']['read_gbps']} GB/s)" in table
    assert f"Machine class **{meta['machine']['machine_class']}" in table
    assert "| step | concurrency | req/s |" in table
    assert table.count("| step1_central_loader |") == 4  # a row per level in each table
    assert "| step1_central_loader | 2 | all |" in table  # prompts and token gaps, per level
    for name in ("throughput.png", "latency.png", "ttft.png", "curves.png"):
        assert (step1_run / name).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.integration
def test_publish_puts_the_table_and_charts_into_the_readmes(step1_run, tmp_path):
    (tmp_path / "README.md").write_text("# Project\n\nIntro.\n")
    (tmp_path / "step1_central_loader").mkdir()
    step_readme = tmp_path / "step1_central_loader" / "README.md"
    step_readme.write_text("# Step 1\n")
    for _ in range(2):  # the second run replaces the section instead of adding another
        written = publish(step1_run, root=tmp_path)
    assert written == [tmp_path / "README.md", step_readme]
    charts = tmp_path / "bench" / "charts" / "quick"
    assert (charts / "throughput.png").read_bytes().startswith(PNG_MAGIC)
    top, step = (tmp_path / "README.md").read_text(), step_readme.read_text()
    assert top.startswith("# Project\n\nIntro.") and top.count("<!-- bench:quick:start -->") == 1
    # A row per level in each of table.md's two tables (the second: prompts and token gaps).
    assert top.count("| step1_central_loader |") == 4 and "(bench/charts/quick/ttft.png)" in top
    assert top.count("| step1_central_loader | 1 | all |") == 1
    assert step.count("## Bench (quick profile)") == 1
    assert step.count("| step1_central_loader |") == 2
    assert "(../bench/charts/quick/throughput.png)" in step


@pytest.mark.integration
def test_a_step_with_wrong_answers_is_refused_before_timing(
    step1_run, start_server, tiny_model_dir, tmp_path
):
    # The same server code on random weights: a real server whose greedy answers differ.
    wrong = start_server("step1_central_loader", GATEWAY_MODEL=str(tiny_model_dir))
    reference = step1_run / "results.json"
    out = tmp_path / "run"
    done = run_bench(
        "--target", wrong.url, "--reference", str(reference), *TINY_RUN, "--results", str(out)
    )
    assert done.returncode == 2, done.stdout + done.stderr
    (entry,) = json.loads((out / "results.json").read_text())["steps"]
    assert entry["status"] == "refused" and entry["levels"] == []
    assert not entry["check"]["passed"] and entry["check"]["mismatches"]
    assert list((out / "records").iterdir()) == []  # no load was ever sent
    assert "refused" in (out / "table.md").read_text()


@pytest.mark.integration
def test_a_step_that_dies_mid_run_is_reported_not_hung_on(step1_run, tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "1", "--reference", str(step1_run / "results.json"), "--results", str(out)]
    long_levels = ["--levels", "2,4", "--run-time", "120", "--max-tokens", "16"]
    harness = subprocess.Popen(
        [sys.executable, "-m", "bench", *args, *long_levels],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_line(harness, "concurrency 2, up to", timeout=150)
        time.sleep(3)  # let requests get going
        kill_child(harness.pid, "step1_central_loader")
        started = time.monotonic()
        rest, _ = harness.communicate(timeout=90)
        assert time.monotonic() - started < 60
    finally:
        if harness.poll() is None:
            harness.kill()
    assert harness.returncode == 2, rest
    (entry,) = json.loads((out / "results.json").read_text())["steps"]
    assert entry["status"] == "died" and entry["check"]["passed"]
    (level,) = entry["levels"]  # concurrency 4 never ran
    assert level["partial"] and "server died" in level["partial_reason"]
    assert "partial: server died" in (out / "table.md").read_text()


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if needle in line:
            return
        assert time.monotonic() < deadline, f"no {needle!r} after {timeout} s"
    raise AssertionError(f"the harness exited before {needle!r}")


def kill_child(parent_pid: int, name: str) -> None:
    children = psutil.Process(parent_pid).children(recursive=True)
    (server,) = [p for p in children if name in " ".join(p.cmdline())]
    server.kill()


def test_the_bytes_chart_draws_each_server_over_the_recorded_floor(tmp_path, capsys):
    def run(steps: dict[str, float], read_gbps: float | None) -> Path:
        machine = {"read_gbps": read_gbps} if read_gbps else {}
        levels = lambda tpot: [{"concurrency": 1, "summary": {"tpot_p50_s": tpot}}]  # noqa: E731
        results = {
            "meta": {"machine": machine},
            "steps": [{"step": name, "levels": levels(t)} for name, t in steps.items()],
        }
        path = tmp_path / f"run{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(results))
        return path

    blocks = run({"step7_real_kv": 0.0175, "peer:llamacpp-f32": 0.0186, "step3_batching": 1}, None)
    float32 = run({"step7_real_kv": 0.0292}, 38.3)
    out = tmp_path / "bytes.png"
    argv = [str(blocks), str(float32), "--out", str(out), "--float32-run", "1"]
    assert bytes_chart.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["bandwidth_gbps"] == 38.3  # the second run's, measured when it ran
    assert printed["points"] == [
        ["step7_real_kv", 96.4, 17.5],
        ["peer:llamacpp-f32", 537.9, 18.6],
        ["step7_real_kv:float32", 537.9, 29.2],
    ]  # step 3 has no known weight format: not drawn
    assert out.read_bytes().startswith(PNG_MAGIC)
    other = json.loads(float32.read_text())
    other["meta"]["machine"]["machine_class"] = "amd-zen3-avx2-2c"
    float32.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="2 classes"):
        bytes_chart.main(argv)


def test_the_readmes_give_the_shared_system_prompt_its_measured_length(tokenizer):
    """Step 4's and step 7's READMEs and the bench's quote the prompt's length in tokens."""
    prompt = json.loads((ROOT / "bench" / "workload.json").read_text())["system_prompt"]
    tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    quoted = {
        "step4_mock_kv/README.md": f"one long system prompt ({tokens} tokens)",
        "step7_real_kv/README.md": f"the {tokens}-token system prompt",
        "bench/README.md": f"one long system prompt ({tokens} tokens of SmolLM2's tokenizer)",
    }
    for readme, phrase in quoted.items():
        assert phrase in " ".join((ROOT / readme).read_text().split()), readme
