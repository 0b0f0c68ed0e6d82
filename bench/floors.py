"""The CI regression check: ratios between steps measured in one run, against stored floors.

A ratio inside one run cancels out the machine: "step 3 gives at least 2x step 1's throughput"
holds on a laptop and on a CI runner alike, where an absolute tokens/s floor would not.
Keys in bench/floors.json read

    "<step A>/<step B> <metric> at max concurrency": floor
    "<step A>/<step B> <metric> at concurrency <N>": floor

and pass when A's metric divided by B's is at least the floor. For a latency, where lower is
better, put the slower step first. Ratios naming a step absent from the run are skipped.
A key may end with "on <workload>" (a name of bench/cli.py's --workload: grounded, decode, ...):
it is checked only on runs of that workload and skipped on others, so one floors file serves
CI's runs of different workloads. A key without it is checked on every run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from bench.workload import workload_name

_KEY = re.compile(
    r"^(?P<a>\S+)/(?P<b>\S+) (?P<metric>\w+) at (max concurrency|concurrency (?P<n>\d+))"
    r"( on (?P<workload>\S+))?$"
)


@dataclass(frozen=True)
class Verdict:
    key: str
    outcome: str  # pass | fail | skip
    message: str


def check_floors(results: dict, floors: dict[str, float]) -> list[Verdict]:
    steps = {entry["step"]: entry for entry in results["steps"]}
    measured = run_workload(results)
    return [_judge(key, float(floor), steps, measured) for key, floor in floors.items()]


def run_workload(results: dict) -> str:
    """The name of the workload a run measured (runs from before names were kept: default)."""
    named = (results.get("meta", {}).get("workload") or {}).get("name")
    path = results.get("config", {}).get("workload_path")
    return named or (workload_name(path) if path else "default")


def _judge(key: str, floor: float, steps: dict[str, dict], measured: str) -> Verdict:
    match = _KEY.match(key)
    if match is None:
        return Verdict(key, "fail", "cannot parse this key (see bench/floors.py)")
    if match["workload"] and match["workload"] != measured:
        return Verdict(key, "skip", f"skipped: this run measured the {measured} workload")
    a, b, metric = match["a"], match["b"], match["metric"]
    absent = [s for s in (a, b) if s not in steps]
    if absent:
        return Verdict(key, "skip", f"skipped: {', '.join(absent)} not in this run")
    concurrency = int(match["n"]) if match["n"] else None
    values = [_value(steps[s], metric, concurrency) for s in (a, b)]
    problems = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if not isinstance(v, str)]
    if problems:
        return Verdict(key, "fail", "; ".join(problems))
    ratio = numbers[0] / numbers[1]
    verdict = "pass" if ratio >= floor else "fail"
    return Verdict(key, verdict, f"{ratio:.2f} (floor {floor:g})")


def _value(entry: dict, metric: str, concurrency: int | None) -> float | str:
    """The metric at that level, or a reason why there is none (a refused step fails)."""
    if entry["status"] != "ok":
        return f"{entry['step']} is {entry['status']}: {entry['message']}"
    levels = entry["levels"]
    level = levels[-1] if concurrency is None else _level(levels, concurrency)
    if level is None:
        return f"{entry['step']} has no concurrency {concurrency}"
    if level["partial"]:
        return f"{entry['step']} concurrency {level['concurrency']} is partial"
    value = level["summary"].get(metric)
    if not value:
        return f"{entry['step']} has no value for {metric}"
    return float(value)


def _level(levels: list[dict], concurrency: int) -> dict | None:
    return next((lv for lv in levels if lv["concurrency"] == concurrency), None)


def run_check(results_dir: Path, floors_path: Path) -> int:
    """Print one line per floor; the exit status is 1 when any floor is not met."""
    results = json.loads((results_dir / "results.json").read_text())
    verdicts = check_floors(results, json.loads(floors_path.read_text()))
    for v in verdicts:
        print(f"{v.outcome.upper():4}  {v.key}: {v.message}")
    failed = sum(v.outcome == "fail" for v in verdicts)
    print(f"{failed} of {len(verdicts)} floors failed" if failed else "all floors met or skipped")
    return 1 if failed else 0
