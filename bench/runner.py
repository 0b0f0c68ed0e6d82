"""The run: for each step, start it, check its answers, warm it up, load it level by level.

Results are written after every step, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import correctness, peers, report
from bench.iterations import draw as draw_iterations
from bench.iterations import iterations
from bench.profiles import CONCURRENCY_CAPS, Profile, plan_levels
from bench.provenance import ForeignCpu, git_facts, library_versions, machine_facts
from bench.records import Record
from bench.servers import ROOT, NotReady, StepServer, TargetServer, discover_steps
from bench.stats import summarise, summarise_classes
from bench.timeline_chart import draw as draw_timeline
from bench.timeline_chart import engine_traces
from bench.workload import Workload, chat_body, load_workload

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class RunConfig:
    profile: Profile
    dtype: str  # what every timed run uses; the answer check always runs in float32
    steps: tuple[str, ...]  # empty when target is set
    target: str | None
    results_dir: Path
    workload_path: Path
    reference_path: Path | None = None  # precomputed answers instead of starting step 1
    skip_check: bool = False
    ready_timeout_s: float = 120.0
    peers: tuple[str, ...] = ()  # reference servers (bench/peers.py), run after the steps

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


class Progress:
    """Prints what is happening and how long the run has taken so far."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        minutes, seconds = divmod(int(self.elapsed_s), 60)
        print(f"[bench {minutes:2d}:{seconds:02d}] {message}", flush=True)


def run_bench(config: RunConfig) -> dict:
    progress = Progress()
    workload = load_workload(config.workload_path)
    for sub in ("records", "logs"):
        (config.results_dir / sub).mkdir(parents=True, exist_ok=True)
    results = _new_results(config, workload)
    results["reference"] = _reference(config, workload, progress)
    for name in _order(config, results["reference"]):
        answers = (results["reference"] or {}).get("answers")
        entry = _bench_one(config, name, workload, answers, progress)
        results["steps"].append(entry)
        if (entry["check"] or {}).get("is_reference"):
            results["reference"] = {
                "source": f"{name} float32",
                "answers": entry["check"]["answers"],
            }
        report.write_json(results, config.results_dir)
    in_order = _names(config)
    results["steps"].sort(key=lambda entry: in_order.index(entry["step"]))
    results["meta"]["elapsed_s"] = round(progress.elapsed_s, 1)
    results["meta"]["finished_at"] = _now()
    report.write_all(results, config.results_dir)
    _link_latest(config.results_dir)
    progress.say(f"done: {config.results_dir}")
    return results


def _new_results(config: RunConfig, workload: Workload) -> dict:
    meta = {
        **git_facts(),
        "started_at": _now(),
        "machine": machine_facts(),
        "versions": library_versions(),
        "workload": {
            "name": workload.name,
            "version": workload.version,
            "sha256": workload.sha256,
            "classes": [asdict(c) for c in workload.classes],
        },
        "concurrency_caps": CONCURRENCY_CAPS,
    }
    return {"schema": 1, "meta": meta, "config": config.to_dict(), "steps": []}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- reference answers


def _reference(config: RunConfig, workload: Workload, progress: Progress) -> dict | None:
    """Answers to check against, unless the reference step is benched first and gives them."""
    if config.skip_check:
        progress.say("answer check skipped (--skip-check)")
        return None
    if config.reference_path is not None:
        answers = correctness.load_reference(config.reference_path)
        return {"source": str(config.reference_path), "answers": answers}
    if correctness.REFERENCE_STEP in config.steps:
        return None  # _order() runs it first; its own check phase records the answers
    if correctness.REFERENCE_STEP not in discover_steps():
        raise SystemExit(f"no {correctness.REFERENCE_STEP} to check against: pass --reference")
    return _reference_from_step(config, workload, progress)


def _order(config: RunConfig, reference: dict | None) -> list[str]:
    """Step order, except that the reference step goes first when the others need its answers."""
    names = _names(config)
    wanted = not config.skip_check and reference is None
    if wanted and correctness.REFERENCE_STEP in names:
        names.remove(correctness.REFERENCE_STEP)
        names.insert(0, correctness.REFERENCE_STEP)
    return names


def _names(config: RunConfig) -> list[str]:
    """Every row of the run: the steps (or the target), then the peers."""
    servers = list(config.steps) or ([config.target] if config.target else [])
    return servers + [peers.PEERS[name].row for name in config.peers]


def _reference_from_step(config: RunConfig, workload: Workload, progress: Progress) -> dict:
    step, dtype = correctness.REFERENCE_STEP, correctness.CHECK_DTYPE
    progress.say(f"reference answers: starting {step} ({dtype})")
    server = StepServer(step, dtype, config.results_dir / "logs" / "reference.log")
    try:
        server.wait_ready(config.ready_timeout_s)
        model = correctness.model_name(server.url)
        answers = correctness.answers(server.url, workload, model)
    finally:
        server.stop()
    return {"source": f"{step} {dtype}", "answers": answers}


# ---------------------------------------------------------------- one step


def _bench_one(
    config: RunConfig, name: str, workload: Workload, reference: dict | None, progress: Progress
) -> dict:
    entry: dict = {"step": name, "status": "ok", "message": None, "check": None, "levels": []}
    server = None
    try:
        server = _start(config, name, _first_dtype(config), progress)
        entry["ready_s"] = round(server.wait_ready(_ready_timeout(config, name)), 1)
        model = server.model or correctness.model_name(server.url)
        checking = not config.skip_check
        if checking and not _check(server, workload, model, reference, entry, progress):
            return entry
        server = _restart_for_timing(config, server, progress, entry)
        entry["dtype"] = server.dtype
        entry["backends"] = backends(server.url)
        _warm_up(server.url, workload, model, config.profile, progress)
        _run_levels(config, server, model, workload, entry, progress)
    except NotReady as exc:
        _fail(entry, "failed_to_start", str(exc), server, progress)
    except httpx.HTTPError as exc:
        status = "died" if server is not None and not server.alive() else "failed"
        _fail(entry, status, f"{type(exc).__name__}: {exc}", server, progress)
    finally:
        if server is not None:
            server.stop()
    return entry


def _first_dtype(config: RunConfig) -> str:
    """Start in float32 when answers will be checked, so one process can do both if it can."""
    checking = not config.skip_check
    return correctness.CHECK_DTYPE if checking else config.dtype


def _ready_timeout(config: RunConfig, name: str) -> float:
    """A peer may need longer than a step: vLLM compiles the model at every start."""
    if peers.is_peer_row(name):
        return max(config.ready_timeout_s, peers.from_row(name).ready_timeout_s)
    return config.ready_timeout_s


def _start(config: RunConfig, name: str, dtype: str, progress: Progress):
    if peers.is_peer_row(name):
        wait = _ready_timeout(config, name)
        progress.say(f"{name}: starting (float32; start-up may take up to {wait:.0f} s)")
        return peers.start(
            peers.from_row(name), config.results_dir / "logs" / f"{_short(name)}.log"
        )
    if config.target:
        progress.say(f"target {name}")
        return TargetServer(name)
    progress.say(f"{name}: starting ({dtype})")
    return StepServer(name, dtype, config.results_dir / "logs" / f"{name}.log")


def _check(server, workload, model: str, reference: dict | None, entry: dict, progress) -> bool:
    if reference is None and server.step == correctness.REFERENCE_STEP:
        answers = correctness.answers(server.url, workload, model)
        entry["check"] = {"passed": True, "is_reference": True, "answers": answers}
        progress.say(f"{server.step}: recorded the reference answers ({len(answers)} prompts)")
        return True
    if reference is None and peers.is_peer_row(server.step):
        entry["note"] = "answers not checked: no reference answers"
        progress.say(f"{server.step}: {entry['note']}; timed anyway")
        return True
    if reference is None:  # the reference step failed: nothing to validate against
        entry["status"], entry["message"] = "refused", "no reference answers to check against"
        progress.say(f"{server.step}: REFUSED, not timed: {entry['message']}")
        return False
    result = correctness.verify(server.url, workload, model, reference)
    entry["check"] = result.to_dict()
    if result.passed:
        progress.say(f"{server.step}: answers match the reference ({len(reference)} prompts)")
        return True
    ids = ", ".join(m["id"] for m in result.mismatches)
    if peers.is_peer_row(server.step):  # another engine's numerics may flip a greedy token
        entry["note"] = f"answers differ from the reference: {ids}"
        progress.say(f"{server.step}: {entry['note']}; a peer is timed anyway")
        return True
    entry["status"], entry["message"] = "refused", f"answers differ from the reference: {ids}"
    progress.say(f"{server.step}: REFUSED, not timed: {entry['message']}")
    return False


def _restart_for_timing(config: RunConfig, server, progress: Progress, entry: dict):
    if config.target or server.dtype == config.dtype or peers.is_peer_row(server.step):
        return server  # peers always serve float32
    server.stop()
    server = _start(config, server.step, config.dtype, progress)
    entry["ready_s"] = round(server.wait_ready(_ready_timeout(config, server.step)), 1)
    return server


def _warm_up(url: str, workload: Workload, model: str, profile: Profile, progress) -> None:
    """A few short requests first, so one-off costs (lazy init, allocator growth) are not timed.
    A generated workload warms up with each class's own kind of prompt, never a timed one."""
    classes = workload.classes or (None,)
    for i in range(profile.warmup_requests):
        prompt = workload.prompt_for(classes[i % len(classes)], i, salt="warmup")
        body = chat_body(workload, prompt, model, min(profile.max_tokens, 8), stream=False)
        httpx.post(url + "/v1/chat/completions", json=body, timeout=300.0).raise_for_status()
    progress.say(f"warmed up with {profile.warmup_requests} requests")


def _fail(entry: dict, status: str, message: str, server, progress: Progress) -> None:
    entry["status"], entry["message"] = status, message
    if server is not None:
        entry["exit_code"] = server.exit_code
        entry["log_tail"] = server.log_tail()
    progress.say(f"{entry['step']}: {status.upper()}: {message}")


# ---------------------------------------------------------------- levels


def _run_levels(
    config: RunConfig, server, model: str, workload: Workload, entry: dict, progress
) -> None:
    cap = CONCURRENCY_CAPS.get(entry["step"])
    for level, users in plan_levels(config.profile.levels, cap):
        result = _run_level(config, server, model, level, (users, workload.extra_users), progress)
        entry["levels"].append(result)
        if result["server_died"]:
            message = f"server died during concurrency {level} (exit code {server.exit_code})"
            _fail(entry, "died", message, server, progress)
            return
    partial = [str(lv["concurrency"]) for lv in entry["levels"] if lv["partial"]]
    if partial:
        entry["status"] = "partial"
        entry["message"] = f"partial results at concurrency {', '.join(partial)}"


def _run_level(
    config: RunConfig, server, model: str, level: int, counts: tuple[int, int], progress
) -> dict:
    """One level: `counts` is (the level's users, after any cap; users of fixed-size classes)."""
    profile, (users, extra) = config.profile, counts
    tag = f"{_short(server.step)}-c{level}"
    records_path = config.results_dir / "records" / f"{tag}.jsonl"
    capped = f" (capped at {users} users)" if users < level else ""
    beside = f" and {extra} more users of fixed-size classes" if extra else ""
    progress.say(
        f"{server.step}: concurrency {level}{capped}{beside}, up to {profile.run_time_s:.0f}"
        f"+{profile.stop_timeout_s:.0f} s or {profile.max_requests} requests"
    )
    records_path.unlink(missing_ok=True)  # the load generator appends: no earlier run's records
    before = last_iteration(server.url)
    drafts_before = speculation(server.url)
    started = time.monotonic()
    loadgen = _spawn_loadgen(config, server.url, model, users + extra, records_path, tag)
    watch = _watch(loadgen, server, profile.level_timeout_s)
    if not watch["server_died"] and not server.alive():
        watch["server_died"] = True  # a --target can only be asked afterwards
    records = read_records(records_path)
    result = _level_result(level, users, records, watch, time.monotonic() - started)
    result["extra_users"] = extra
    result["records_file"] = str(records_path.relative_to(config.results_dir))
    drafts_after = speculation(server.url)
    if drafts_before is not None and drafts_after is not None:
        result["speculation"] = {k: drafts_after[k] - drafts_before[k] for k in drafts_after}
    timeline = save_timeline(server.url, before, config.results_dir / "timelines", tag)
    if timeline is not None:
        result["timeline_file"] = str(timeline.relative_to(config.results_dir))
    progress.say(_level_line(server.step, result))
    return result


def backends(url: str) -> dict[str, str] | None:
    """What the server says it runs (gateway_engine_info, step 7 and later), or None."""
    try:
        response = httpx.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or "gateway_engine_info" not in response.text:
        return None
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "gateway_engine_info":
                return dict(sample.labels)
    return None


SPEC_COUNTERS = {
    "gateway_spec_verifications_total": "verifications",
    "gateway_spec_drafted_tokens_total": "drafted",
    "gateway_spec_accepted_tokens_total": "accepted",
}


def speculation(url: str) -> dict[str, float] | None:
    """A speculating server's draft counters now (step 8's gateway_spec_*), or None."""
    try:
        response = httpx.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200 or "gateway_spec_drafted_tokens" not in response.text:
        return None
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name in SPEC_COUNTERS:
                found[SPEC_COUNTERS[sample.name]] = sample.value
    return found if len(found) == len(SPEC_COUNTERS) else None


def last_iteration(url: str) -> int | None:
    """The number of the engine's latest recorded iteration; None: it keeps no timeline."""
    try:
        response = httpx.get(url + "/debug/timeline?last=1", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    latest: dict[int, int] = {}  # by process: step 10's router merges two engines' numbers
    for e in response.json()["traceEvents"]:
        if e["ph"] == "X" and e["name"].startswith("iteration "):
            latest[e["pid"]] = max(latest.get(e["pid"], 0), e["args"]["iteration"])
    return min(latest.values(), default=0)  # the level's iterations of every engine, and more


def save_timeline(url: str, after: int | None, folder: Path, tag: str) -> Path | None:
    """The level's iterations (those after `after`) as a trace, and drawn; None without."""
    if after is None:
        return None
    try:
        response = httpx.get(url + f"/debug/timeline?after={after}", timeout=60)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.json"
    path.write_text(response.text)
    for name, trace in engine_traces(response.json()).items():  # pictures per engine
        suffix = re.sub(r"[^A-Za-z0-9]+", "-", f"-{name}") if name else ""
        draw_timeline(trace, folder / f"{tag}{suffix}.png", title=f"{tag} {name}", count=160)
        if its := iterations(trace):  # its iterations' time by rows (bench/iterations.py)
            draw_iterations(its, folder / f"{tag}{suffix}-rows.png", title=f"{tag} {name}")
    return path


def _short(step: str) -> str:
    """The file-name tag of a row: step3, peer-vllm-cpu, target."""
    if peers.is_peer_row(step):
        return step.replace(":", "-")
    return step.split("_")[0] if step.startswith("step") else "target"


def _spawn_loadgen(config: RunConfig, url: str, model: str, users: int, records: Path, tag: str):
    profile = config.profile
    args = {
        "--host": url,
        "--users": users,
        "--run-time": profile.run_time_s,
        "--stop-timeout": profile.stop_timeout_s,
        "--model": model,
        "--max-tokens": profile.max_tokens,
        "--max-requests": profile.max_requests,
        "--workload": config.workload_path,
        "--records": records,
        "--salt": tag.rsplit("-", 1)[1],  # c<level>: each level's generated prompts are new
    }
    flags = [str(part) for pair in args.items() for part in pair]
    log = open(config.results_dir / "logs" / f"{tag}-loadgen.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.loadgen", *flags], cwd=ROOT, stdout=log, stderr=log
    )


def _watch(loadgen: subprocess.Popen, server, timeout_s: float) -> dict:
    """Wait for the load generator, sampling server memory; stop early if the server dies."""
    peak, started = 0, time.monotonic()
    foreign = ForeignCpu(server.cpu_seconds)
    died = timed_out = False
    while loadgen.poll() is None:
        peak = max(peak, server.rss_bytes() or 0)
        if server.exited():
            died = True
            break
        if time.monotonic() - started > timeout_s:
            timed_out = True
            break
        time.sleep(0.25)
    _end(loadgen)
    rc = loadgen.returncode if not (died or timed_out) else None
    return {
        "server_died": died,
        "timed_out": timed_out,
        "loadgen_rc": rc,
        "peak_rss": peak,
        "foreign_cpu": foreign.share(),
    }


def _end(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_records(path: Path) -> list[Record]:
    """Every complete line; a last line cut off by a kill is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(Record.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return records


def _level_result(level: int, users: int, records: list[Record], watch: dict, took: float):
    failed_loadgen = watch["loadgen_rc"] not in (0, None)
    partial = watch["server_died"] or watch["timed_out"] or failed_loadgen
    reasons = [
        ("server died", watch["server_died"]),
        ("level timed out", watch["timed_out"]),
        (f"load generator exited {watch['loadgen_rc']}", failed_loadgen),
    ]
    return {
        "concurrency": level,
        "users": users,
        "partial": partial,
        "partial_reason": ", ".join(text for text, hit in reasons if hit) or None,
        "server_died": watch["server_died"],
        "duration_s": round(took, 1),
        "peak_rss_mb": round(watch["peak_rss"] / 2**20, 1) if watch["peak_rss"] else None,
        "foreign_cpu": watch["foreign_cpu"],
        "summary": summarise(records),
        "classes": summarise_classes(records),
    }


def _level_line(step: str, result: dict) -> str:
    s = result["summary"]
    line = (
        f"{step}: concurrency {result['concurrency']}: {s['completed']}/{s['requests']} ok "
        f"({s['cut_off']} cut off), "
        f"{report.fmt(s['output_tok_s'], 1)} tok/s, e2e p50 {report.fmt(s['e2e_p50_s'], 2)} s, "
        f"took {result['duration_s']:.0f} s"
    )
    return line + (f" PARTIAL ({result['partial_reason']})" if result["partial"] else "")


def _link_latest(results_dir: Path) -> None:
    """bench/results/latest -> the newest run, when the run lives under bench/results."""
    if results_dir.resolve().parent != RESULTS_ROOT:
        return
    latest = RESULTS_ROOT / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(results_dir.name)
