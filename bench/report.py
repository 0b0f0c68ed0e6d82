"""Writing a run down: results.json (everything), table.md (the summary) and the charts."""

from __future__ import annotations

import json
from pathlib import Path

from bench.machine import UNKNOWN
from bench.peers import is_peer_row
from bench.profiles import CONCURRENCY_CAPS

COLUMNS = (
    "step",
    "concurrency",
    "req/s",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "TPOT p50 ms",
    "e2e p50 s",
    "e2e p99 s",
    "errors",
    "rejected",
    "peak RSS MB",
    "other CPU",
    "note",
)


# Per level and request class: what the long-prompt and mixed workloads are read by.
TOKEN_COLUMNS = (
    "step",
    "concurrency",
    "class",
    "completed",
    "prompt tokens p50",
    "prompt tok/s",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "ITL max ms",
    "stopped early",
)


def write_json(results: dict, results_dir: Path) -> Path:
    path = results_dir / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def write_all(results: dict, results_dir: Path) -> None:
    from bench import charts  # matplotlib is slow to import; only the end of a run needs it

    write_json(results, results_dir)
    (results_dir / "table.md").write_text(markdown(results))
    charts.write_charts(results, results_dir)


def fmt(value: float | None, digits: int, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def markdown(results: dict) -> str:
    lines = [*_header(results), *_busy_warning(results), "", table_row(COLUMNS)]
    lines.append(table_row(["---"] * len(COLUMNS)))
    for entry in results["steps"]:
        lines.extend(_step_rows(entry))
    lines.extend(["", *token_table(results), "", *_footnotes(results)])
    return "\n".join(lines) + "\n"


def token_table(results: dict) -> list[str]:
    """Prompts and the gaps between tokens, per level and request class ('all' without)."""
    lines = [table_row(TOKEN_COLUMNS), table_row(["---"] * len(TOKEN_COLUMNS))]
    for entry in results["steps"]:
        for level in entry["levels"]:
            classes = level.get("classes") or {"all": level["summary"]}
            for name, summary in classes.items():
                lines.append(table_row(_token_cells(entry["step"], level, name, summary)))
    return lines


def _token_cells(step: str, level: dict, name: str, s: dict) -> list[str]:
    extra = level.get("extra_users") or 0
    concurrency = str(level["concurrency"]) + (f" (+{extra})" if extra else "")
    return [
        step,
        concurrency,
        name,
        str(s["completed"]),
        fmt(s.get("prompt_tokens_p50"), 0),
        fmt(s.get("prompt_tok_s"), 1),
        fmt(s["output_tok_s"], 1),
        fmt(s["ttft_p50_s"], 0, 1000),
        fmt(s["ttft_p99_s"], 0, 1000),
        fmt(s["itl_p50_s"], 0, 1000),
        fmt(s["itl_p99_s"], 0, 1000),
        fmt(s.get("itl_max_s"), 0, 1000),
        str(s.get("stopped_early", "–")),
    ]


def _header(results: dict) -> list[str]:
    meta, config = results["meta"], results["config"]
    profile, machine, versions = config["profile"], meta["machine"], meta["versions"]
    commit = (meta.get("commit") or "unknown")[:10] + (" (dirty)" if meta.get("dirty") else "")
    read = f" (read at {machine['read_gbps']} GB/s)" if machine.get("read_gbps") else ""
    pinned = (
        " where the workload does not pin it" if (meta.get("workload") or {}).get("classes") else ""
    )
    return [
        f"Profile **{profile['name']}**, dtype **{config['dtype']}**, "
        f"max_tokens {profile['max_tokens']}{pinned}, temperature 0, streaming; "
        f"each level: {profile['run_time_s']:.0f} s of new requests + up to "
        f"{profile['stop_timeout_s']:.0f} s to finish, at most {profile['max_requests']} requests.",
        f"Machine class **{machine_label(machine)}**; commit {commit}; {machine['cpu_model']}, "
        f"{machine['cores']} cores, {machine['memory_gb']} GB{read}, device {machine['device']}; "
        f"torch {versions['torch']}, transformers {versions['transformers']}, "
        f"locust {versions['locust']}.",
        _workload_line(meta.get("workload") or {}),
    ]


def machine_label(machine: dict) -> str:
    """The class, with the AVX-512 parts and AMX it has: `amd-zen4-avx512-2c (avx512_bf16, ...)`.

    Runs recorded before the class was have none: `unknown`."""
    isa = [f for f in machine.get("isa", ()) if f.startswith(("avx512_", "amx_"))]
    cls = machine.get("machine_class") or UNKNOWN
    return f"{cls} ({', '.join(isa)})" if isa else cls


def _workload_line(workload: dict) -> str:
    """Which prompts; a generated workload's classes pin their own users and answer lengths."""
    name = workload.get("name", "default")
    line = f"Workload **{name}** (version {workload.get('version', '?')})"
    classes = workload.get("classes") or []
    if not classes:
        return line + ": its prompts round-robin, the profile's max_tokens."
    parts = [
        f"{c['name']}: {_users(c['users'])}, {_prompt_kind(c)}, max_tokens "
        f"{c['max_tokens'] or 'of the profile'}"
        for c in classes
    ]
    return line + ", every prompt new: " + "; ".join(parts) + "."


def _users(users: int | str) -> str:
    return "the level's users" if users == "level" else f"{users} more users"


def _prompt_kind(request_class: dict) -> str:
    if request_class["prompt"] == "document":
        low, high = request_class["prompt_tokens"]
        return f"documents of {low:,}-{high:,} prompt tokens"
    return "short prompts asking for a long story"


BUSY_SHARE = 0.15  # of all cores, used by processes other than the bench and the server


def _busy_warning(results: dict) -> list[str]:
    shares = [lv.get("foreign_cpu") for e in results["steps"] for lv in e["levels"]]
    peak = max((x for x in shares if x is not None), default=0.0)
    if peak <= BUSY_SHARE:
        return []
    return [
        f"**Warning: the machine was busy**: other processes used up to {peak:.0%} of its CPU "
        "during a level (column 'other CPU'), so these timings are unreliable."
    ]


def table_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _step_rows(entry: dict) -> list[str]:
    if not entry["levels"]:
        note = f"**{entry['status']}**: {entry['message']}"
        return [table_row([entry["step"], *["–"] * (len(COLUMNS) - 2), note])]
    rows = [table_row(_level_cells(entry["step"], level)) for level in entry["levels"]]
    if entry.get("backends"):  # what the server said it runs (step 7: kernels, matmuls)
        said = " ".join(f"{k}={v}" for k, v in sorted(entry["backends"].items()))
        rows.append(table_row([entry["step"], *["–"] * (len(COLUMNS) - 2), f"backends: {said}"]))
    if entry.get("note"):  # a peer whose answers differ is timed anyway, with this said
        rows.append(table_row([entry["step"], *["–"] * (len(COLUMNS) - 2), entry["note"]]))
    if entry["status"] != "ok":
        rows.append(table_row([entry["step"], *["–"] * (len(COLUMNS) - 2), entry["message"]]))
    return rows


def _level_cells(step: str, level: dict) -> list[str]:
    s = level["summary"]
    concurrency = str(level["concurrency"])
    if level["users"] < level["concurrency"]:
        concurrency += f" (cap {level['users']})"
    return [
        step,
        concurrency,
        fmt(s["req_per_s"], 2),
        fmt(s["output_tok_s"], 1),
        fmt(s["ttft_p50_s"], 0, 1000),
        fmt(s["ttft_p99_s"], 0, 1000),
        fmt(s["tpot_p50_s"], 0, 1000),
        fmt(s["e2e_p50_s"], 2),
        fmt(s["e2e_p99_s"], 2),
        percent(s["error_rate"]),
        percent(s["rejection_rate"]),
        fmt(level["peak_rss_mb"], 0),
        percent(level.get("foreign_cpu")),
        _note(level),
    ]


def _note(level: dict) -> str:
    notes = [f"partial: {level['partial_reason']}"] if level["partial"] else []
    spec = level.get("speculation")
    if spec and spec["drafted"]:  # a speculating step: how its drafts fared
        notes.append(
            f"drafts: {spec['accepted'] / spec['drafted']:.0%} of {spec['drafted']:.0f} accepted,"
            f" {tokens_per_verification(spec):.2f} tokens per verification"
        )
    if level["summary"]["cut_off"]:
        notes.append(f"{level['summary']['cut_off']} cut off at the end")
    busy = level.get("foreign_cpu")
    if busy is not None and busy > BUSY_SHARE:
        notes.append(f"other processes used {busy:.0%} of the CPU: not comparable")
    if not level["summary"]["completed"]:
        notes.append("no request completed")
    return "; ".join(notes)


def tokens_per_verification(spec: dict) -> float:
    """Tokens one verification appends: the drafted tokens it kept, plus the model's own token
    that every verification yields (the correction, or the next token after a full accept)."""
    return spec["accepted"] / spec["verifications"] + 1


def _repository_path(source: str) -> str:
    """A reference file under bench/ as the repository names it, whichever checkout the run was
    made from (`/home/me/gateway/bench/charts/full/results.json` -> `bench/charts/full/...`)."""
    parts = Path(source).parts
    if "bench" not in parts:
        return source
    return Path(*parts[len(parts) - 1 - parts[::-1].index("bench") :]).as_posix()


def _footnotes(results: dict) -> list[str]:
    notes = [
        "req/s and out tok/s count completed requests over the window from the first send to "
        "the last byte. TTFT: to the first text chunk. TPOT: per output token after the first. "
        "errors: share of requests that failed; rejected: share of first attempts answered "
        "429/503. Peak RSS: the server process, sampled every 0.25 s. Other CPU: share of the "
        "machine's CPU used by processes other than the bench and the server during the level.",
        "Second table, per level and request class (all: the level's requests together): "
        "concurrency (+N) counts the users of fixed-size classes beside the level's; prompt "
        "tok/s: prompt tokens of completed requests over the same window as out tok/s; ITL: gaps "
        "between text chunks of every completed stream, max the longest; stopped early: answers "
        "that ended before max_tokens (finish_reason stop).",
    ]
    caps = ", ".join(f"{step} at {cap}" for step, cap in CONCURRENCY_CAPS.items())
    notes.append(
        f"Concurrency is capped for {caps} users: step 0 loads a fresh copy of the weights for "
        "every request in flight, so more users would only measure memory exhaustion."
    )
    reference = results.get("reference")
    source = reference and _repository_path(reference["source"])
    check = f"checked against {source}" if reference else "not checked"
    notes.append(f"Greedy answers (float32) {check} before timing; refused steps are not timed.")
    if any(lv.get("speculation") for entry in results["steps"] for lv in entry["levels"]):
        notes.append(
            "Tokens per verification: the drafted tokens one verification kept plus the model's "
            "own token that every verification yields (accepted / verifications + 1)."
        )
    if any(is_peer_row(entry["step"]) for entry in results["steps"]):
        notes.append(
            "peer:* rows are reference servers (bench/peers.py) serving the same weights in "
            "float32, whatever the dtype above. Their answers are checked too, but another "
            "engine's numerics may flip a greedy token, so a mismatch is noted, not refused."
        )
    return [f"- {note}" for note in notes]
