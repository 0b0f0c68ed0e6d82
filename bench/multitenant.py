"""Step 9's policy comparison: multi-tenant chat over one engine alone, then over step 9 in front
of local replicas of that same engine (step 8, step9_router/replicas.py) with each routing
policy, in one run. Baseline and replicas run the same engine, so the comparison changes one
thing: the router and the number of engines.

    python -m bench multitenant                            # step 8 alone, then 3 policies
    python -m bench multitenant --policies cache_aware --users 8 --run-time 60

The workload (multitenant.json): tenants, each with its own long system prompt (239-258 tokens) and
questions. Every user holds conversations: user u's conversation c belongs to tenant
(u + c) % tenants and asks `turns` of its questions in a row, each turn sending the whole history
(system prompt, earlier questions, the answers received), streamed and greedy, with
Cache-Control: no-cache (the router's answer cache would only measure a dictionary). Users are
closed-loop; new requests start for `run_time` s, those in flight get `stop_timeout` s more.

Each configuration is a fresh server process: `python -m step8_speculative`, or `python -m
step9_router --replicas N --policy P` (which starts its own replicas). Its greedy answers to every
tenant's first question are checked against the first configuration's before it is timed. The
cores are shared evenly: OMP_NUM_THREADS is cores / engines for every engine. Measured: the
replicas' prefix-cache hit rate over the load (gateway_prefix_cache_hit_tokens_total /
gateway_prefix_cache_queried_tokens_total, read from each replica's /metrics before and after),
TTFT p50/p99, output tokens/s, e2e p50, errors, and each replica's share of the requests.
Writes results.json, table.md and multitenant.png to bench/results/multitenant-<time>/; with
--publish, also the table into step9_router/README.md (between its multitenant markers) and the
chart to step9_router/policies.png.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.provenance import ForeignCpu, git_facts, library_versions, machine_facts
from bench.records import Record, StreamParser, backoff_delay, retry_after_seconds
from bench.runner import RESULTS_ROOT
from bench.servers import NotReady, ProcessServer, free_port
from bench.stats import summarise

WORKLOAD = Path(__file__).with_name("multitenant.json")
STEP9 = Path(__file__).resolve().parent.parent / "step9_router"
ENGINE = "step8_speculative"  # what step 9's local replicas run (step9_router/replicas.py)
BASELINE = "step8"  # the configuration that runs one ENGINE alone
MARKERS = ("<!-- multitenant:start -->", "<!-- multitenant:end -->")
POLICIES = ("round_robin", "least_loaded", "cache_aware")
MODEL = "SmolLM2-135M-Instruct"
HIT, QUERIED = "gateway_prefix_cache_hit_tokens_total", "gateway_prefix_cache_queried_tokens_total"


@dataclass(frozen=True)
class Tenant:
    id: str
    system_prompt: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    version: int
    turns: int
    tenants: tuple[Tenant, ...]
    sha256: str

    def conversation(self, user: int, index: int) -> tuple[Tenant, list[str]]:
        """User `user`'s `index`-th conversation: its tenant and its questions, in order."""
        tenant = self.tenants[(user + index) % len(self.tenants)]
        start = (index // len(self.tenants)) * self.turns + user
        asked = [tenant.questions[(start + k) % len(tenant.questions)] for k in range(self.turns)]
        return tenant, asked


def load_workload(path: Path = WORKLOAD) -> Workload:
    raw = path.read_bytes()
    data = json.loads(raw)
    tenants = tuple(
        Tenant(t["id"], t["system_prompt"], tuple(t["questions"])) for t in data["tenants"]
    )
    return Workload(
        int(data["version"]), int(data["turns"]), tenants, hashlib.sha256(raw).hexdigest()
    )


@dataclass(frozen=True)
class Settings:
    users: int = 8
    run_time_s: float = 60.0
    stop_timeout_s: float = 60.0
    max_tokens: int = 64
    replicas: int = 2
    check_max_tokens: int = 16
    max_attempts: int = 4  # first try plus up to three retries after 429/503
    num_kv_blocks: int | None = None  # every engine's pool; None: the engines' default


# ---------------------------------------------------------------- the servers


def start(name: str, settings: Settings, log_dir: Path) -> ProcessServer:
    """The engine alone (BASELINE), or `step9:<policy>` with its replicas, on a free port."""
    port, engines = free_port(), 1 if name == BASELINE else settings.replicas
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // engines))}
    if settings.num_kv_blocks:
        env["GATEWAY_NUM_KV_BLOCKS"] = str(settings.num_kv_blocks)
    flags = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    flags += ["--log-level", "warning"]
    if name == BASELINE:  # the replicas' response cache is off too: the router keeps one
        argv = [sys.executable, "-m", ENGINE, *flags, "--response-cache", "false"]
    else:
        policy = name.split(":", 1)[1]
        argv = [sys.executable, "-m", "step9_router", *flags, "--policy", policy]
        argv += ["--replicas", str(settings.replicas)]
    log = log_dir / f"{name.replace(':', '-')}.log"
    return ProcessServer(name, argv, log, port, "float32", env=env, model=MODEL)


def engine_urls(server: ProcessServer) -> list[str]:
    """The engines whose caches count: the server itself, or the router's replicas."""
    if server.step == BASELINE:
        return [server.url]
    upstreams = httpx.get(server.url + "/health", timeout=10).json()["upstreams"]
    return [f"http://{name}" for name in sorted(upstreams)]


def counters(urls: list[str]) -> dict[str, dict[str, float]]:
    """Per engine: prefix-cache hit and queried tokens, and successful requests, so far."""
    wanted = {HIT: "hit", QUERIED: "queried", "gateway_requests_total": "requests"}
    result = {}
    for url in urls:
        values = dict.fromkeys(wanted.values(), 0.0)
        text = httpx.get(url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in wanted and s.labels.get("outcome", "success") == "success":
                    values[wanted[s.name]] += s.value
        result[url] = values
    return result


def cache_summary(before: dict, after: dict) -> dict:
    delta = {url: {k: after[url][k] - before[url][k] for k in after[url]} for url in after}
    hit = sum(d["hit"] for d in delta.values())
    queried = sum(d["queried"] for d in delta.values())
    served = sum(d["requests"] for d in delta.values())
    split = [round(d["requests"] / served, 3) if served else None for d in delta.values()]
    return {
        "hit_tokens": hit,
        "queried_tokens": queried,
        "hit_rate": hit / queried if queried else None,
        "split": split,
    }


# ---------------------------------------------------------------- requests


def chat_body(tenant: Tenant, history: list[dict], max_tokens: int, stream: bool) -> dict:
    messages = [{"role": "system", "content": tenant.system_prompt}, *history]
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def check_answers(url: str, workload: Workload, settings: Settings) -> dict[str, str]:
    """Each tenant's first question, greedy, whole: what every configuration must answer."""
    answers = {}
    for tenant in workload.tenants:
        history = [{"role": "user", "content": tenant.questions[0]}]
        body = chat_body(tenant, history, settings.check_max_tokens, stream=False)
        response = httpx.post(
            url + "/v1/chat/completions",
            json=body,
            headers={"Cache-Control": "no-cache"},
            timeout=300,
        )
        response.raise_for_status()
        answers[tenant.id] = response.json()["choices"][0]["message"]["content"]
    return answers


def warm_up(url: str) -> None:
    """Two short requests outside every tenant, so one-off costs are not timed."""
    for text in ("Hello!", "Say one word."):
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
        httpx.post(url + "/v1/chat/completions", json=body, timeout=300).raise_for_status()


class Load:
    """Closed-loop users holding conversations until the deadline; one Record per attempt."""

    def __init__(self, url: str, workload: Workload, settings: Settings) -> None:
        self.url, self.workload, self.settings = url, workload, settings
        self.records: list[Record] = []
        self.ids = iter(range(10**9))

    async def run(self) -> list[Record]:
        deadline = time.monotonic() + self.settings.run_time_s
        timeout = httpx.Timeout(300.0, connect=10.0)
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            users = [
                asyncio.create_task(self.user(client, u, deadline))
                for u in range(self.settings.users)
            ]
            await asyncio.wait(
                users, timeout=self.settings.run_time_s + self.settings.stop_timeout_s
            )
            for task in users:
                task.cancel()
            await asyncio.gather(*users, return_exceptions=True)
        return self.records

    async def user(self, client: httpx.AsyncClient, user: int, deadline: float) -> None:
        index = 0
        while time.monotonic() < deadline:
            tenant, questions = self.workload.conversation(user, index)
            history: list[dict] = []
            for k, question in enumerate(questions):
                if time.monotonic() >= deadline:
                    return
                history.append({"role": "user", "content": question})
                answer = await self.ask(client, tenant, history, f"{tenant.id}-t{k}")
                if answer is None:  # failed: this conversation ends here
                    break
                history.append({"role": "assistant", "content": answer})
            index += 1

    async def ask(self, client, tenant: Tenant, history: list[dict], prompt_id: str) -> str | None:
        body = chat_body(tenant, history, self.settings.max_tokens, stream=True)
        request_id = next(self.ids)
        for attempt in range(self.settings.max_attempts):
            record = Record(request_id, attempt, prompt_id, time.time(), 0)
            self.records.append(record)
            answer = await self.attempt(client, record, body)
            if not record.rejected or record.retry_after_s is None:
                return answer if record.ok else None
            await asyncio.sleep(backoff_delay(attempt, record.retry_after_s))
        return None

    async def attempt(self, client, record: Record, body: dict) -> str | None:
        sent = time.monotonic()
        parser, text = StreamParser(record, sent), []
        headers = {"Cache-Control": "no-cache"}
        try:
            async with client.stream(
                "POST", self.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                record.status = response.status_code
                if response.status_code != 200:
                    record.retry_after_s = retry_after_seconds(response.headers.get("retry-after"))
                    record.error = f"HTTP {response.status_code}"
                else:
                    async for line in response.aiter_lines():
                        text.append(_content(line))
                        if parser.feed(time.monotonic(), line):
                            break
                    parser.close()
        except asyncio.CancelledError:  # the stop timeout passed: cut off, neither ok nor failed
            parser.close()
            record.cut_off, record.error = True, "cut off when the run ended"
            raise
        except httpx.HTTPError as exc:
            record.error = record.error or f"{type(exc).__name__}: {exc}"
        finally:
            record.e2e_s = time.monotonic() - sent
        return "".join(text)


def _content(line: str) -> str:
    if not line.startswith("data: {"):
        return ""
    chunk = json.loads(line[len("data: ") :])
    return "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))


# ---------------------------------------------------------------- one configuration, the run


def measure(name: str, workload: Workload, settings: Settings, out: Path, reference) -> dict:
    entry: dict = {"config": name, "status": "ok", "message": None}
    server = start(name, settings, out / "logs")
    try:
        entry["ready_s"] = round(server.wait_ready(600), 1)
        answers = check_answers(server.url, workload, settings)
        if reference is not None and answers != reference:
            entry.update(status="refused", message="answers differ", answers=answers)
            return entry
        entry["answers"] = answers
        warm_up(server.url)
        urls = engine_urls(server)
        before, foreign = counters(urls), ForeignCpu(server.cpu_seconds)
        records = asyncio.run(Load(server.url, workload, settings).run())
        entry["other_cpu"] = foreign.share()
        entry["cache"] = cache_summary(before, counters(urls))
        entry["summary"] = summarise(records)
        (out / "records" / f"{name.replace(':', '-')}.jsonl").write_text(
            "".join(r.to_json() + "\n" for r in records)
        )
    except (NotReady, httpx.HTTPError) as exc:
        entry.update(status="failed", message=f"{type(exc).__name__}: {exc}", log=server.log_tail())
    finally:
        server.stop()
    return entry


def run(configs: list[str], settings: Settings, workload_path: Path, out: Path) -> dict:
    workload = load_workload(workload_path)
    for sub in ("logs", "records"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    results: dict = {
        "schema": 1,
        "meta": {**git_facts(), "machine": machine_facts(), "versions": library_versions()},
        "workload": {"version": workload.version, "sha256": workload.sha256},
        "engine": ENGINE,  # the baseline's and every replica's
        "settings": asdict(settings),
        "configs": [],
    }
    reference = None
    for name in configs:
        print(f"[multitenant] {name}: starting", flush=True)
        entry = measure(name, workload, settings, out, reference)
        reference = reference or entry.get("answers")
        results["configs"].append(entry)
        print(f"[multitenant] {name}: {entry['status']} {_line(entry)}", flush=True)
        report.write_json(results, out)
    (out / "table.md").write_text(markdown(results))
    chart(results, out / "multitenant.png")
    return results


# ---------------------------------------------------------------- table and chart

COLUMNS = (
    "configuration",
    "requests ok",
    "errors",
    "prefix-cache hit rate",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "out tok/s",
    "e2e p50 s",
    "requests per replica",
    "other CPU",
)


def _cells(entry: dict) -> list[str]:
    if entry["status"] != "ok":
        return [entry["config"], *["–"] * (len(COLUMNS) - 2), entry["message"] or entry["status"]]
    s, cache = entry["summary"], entry["cache"]
    split = " / ".join(report.percent(x) for x in cache["split"])
    return [
        entry["config"],
        str(s["completed"]),
        str(s["errors"]),
        report.percent(cache["hit_rate"]),
        report.fmt(s["ttft_p50_s"], 0, 1000),
        report.fmt(s["ttft_p99_s"], 0, 1000),
        report.fmt(s["output_tok_s"], 1),
        report.fmt(s["e2e_p50_s"], 2),
        split,
        report.percent(entry.get("other_cpu")),
    ]


def _line(entry: dict) -> str:
    return " | ".join(_cells(entry)[1:]) if entry["status"] == "ok" else (entry["message"] or "")


def _configurations(results: dict) -> str:
    """What was compared: one engine alone and step 9 over replicas of the same engine."""
    replicas, engine = results["settings"]["replicas"], results.get("engine")
    if engine is None:  # a run recorded before the engine was
        return f"step 9 over {replicas} local replicas."
    return f"`{engine}` alone ({BASELINE}), then step 9 over {replicas} local `{engine}` replicas."


def markdown(results: dict) -> str:
    s, meta = results["settings"], results["meta"]
    lines = [
        f"Multi-tenant chat, {s['users']} users, {s['run_time_s']:g} s of new requests "
        f"(+ up to {s['stop_timeout_s']:g} s), max_tokens {s['max_tokens']}, greedy, streaming; "
        f"{_configurations(results)} Workload v{results['workload']['version']}.",
        f"Machine class **{report.machine_label(meta['machine'])}**; commit "
        f"{(meta.get('commit') or 'unknown')[:10]}; {meta['machine'].get('cpu_model')}, "
        f"{meta['machine'].get('cores')} cores.",
        "",
        report.table_row(COLUMNS),
        report.table_row(["---"] * len(COLUMNS)),
        *(report.table_row(_cells(entry)) for entry in results["configs"]),
    ]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> Path | None:
    from bench.charts import plt  # matplotlib is slow to import: only at the end

    timed = [e for e in results["configs"] if e["status"] == "ok"]
    if not timed:
        return None
    names = [e["config"] for e in timed]
    panels = [
        ("prefix-cache hit rate (%)", [100 * (e["cache"]["hit_rate"] or 0) for e in timed]),
        ("TTFT p50 (s)", [e["summary"]["ttft_p50_s"] or 0 for e in timed]),
        ("TTFT p99 (s)", [e["summary"]["ttft_p99_s"] or 0 for e in timed]),
        ("output tokens/s", [e["summary"]["output_tok_s"] or 0 for e in timed]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.bar(range(len(names)), values, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def publish(out: Path, folder: Path = STEP9) -> Path:
    """The run's table into the step's README, between its markers; the chart beside it."""
    readme = folder / "README.md"
    if (out / "multitenant.png").exists():
        shutil.copyfile(out / "multitenant.png", folder / "policies.png")
    table = (out / "table.md").read_text().strip()
    block = f"{MARKERS[0]}\n{table}\n\n![policies](policies.png)\n{MARKERS[1]}"
    pattern = re.compile(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), re.DOTALL)
    text = readme.read_text()
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {MARKERS[0]} ... {MARKERS[1]} section")
    readme.write_text(pattern.sub(lambda _: block, text))
    return readme


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench multitenant", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--policies", default=",".join(POLICIES), help="step 9 policies, comma-separated"
    )
    p.add_argument(
        "--no-baseline", action="store_true", help=f"skip the baseline: one {ENGINE} alone"
    )
    p.add_argument("--users", type=int, default=Settings.users)
    p.add_argument("--run-time", type=float, default=Settings.run_time_s, help="s of new requests")
    p.add_argument("--stop-timeout", type=float, default=Settings.stop_timeout_s)
    p.add_argument("--max-tokens", type=int, default=Settings.max_tokens)
    p.add_argument("--replicas", type=int, default=Settings.replicas)
    p.add_argument("--num-kv-blocks", type=int, help="every engine's KV pool (default: theirs)")
    p.add_argument("--workload", type=Path, default=WORKLOAD)
    p.add_argument("--results", type=Path, help="default: bench/results/multitenant-<time>")
    p.add_argument("--publish", action="store_true", help="into step9_router/README.md too")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = Settings(
        users=args.users,
        run_time_s=args.run_time,
        stop_timeout_s=args.stop_timeout,
        max_tokens=args.max_tokens,
        replicas=args.replicas,
        num_kv_blocks=args.num_kv_blocks,
    )
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
    configs = ([] if args.no_baseline else [BASELINE]) + [f"step9:{p}" for p in policies]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.results or RESULTS_ROOT / f"multitenant-{stamp}").resolve()
    results = run(configs, settings, args.workload, out)
    print((out / "table.md").read_text())
    print(f"wrote {out}")
    if args.publish:
        print(f"updated {publish(out)}")
    return 0 if all(e["status"] == "ok" for e in results["configs"]) else 2
