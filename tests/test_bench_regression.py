"""bench/regression.py on a synthetic history: a planted regression is flagged, jitter is not,
the floor ratios match floors.py, the charts are PNGs, and a short history says it is short."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import floors, history, regression

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"machine_class": "amd-zen5-avx512-2c", "cpu_model": "AMD EPYC", "cores": 2}
# Run-to-run jitter of a 15 s level, as the quick runs show it: within about +-7% of the middle.
JITTER = (1.00, 0.93, 1.06, 0.97, 1.04, 0.95)
BASE = {  # step -> (output tok/s, TTFT p50 s) at concurrency 8
    "step1_central_loader": (10.0, 2.0),
    "step3_batching": (30.0, 1.0),
    "step4_mock_kv": (32.0, 0.25),
}
FLOORS = {
    "step3_batching/step1_central_loader output_tok_s at max concurrency": 1.3,
    "step3_batching/step4_mock_kv ttft_p50_s at max concurrency": 1.5,
}


def results(values: dict[str, tuple[float, float]], commit: str, status: dict | None = None):
    """A results.json: each step at concurrency 1 (fixed) and 8 (the given values)."""

    def step(name: str, tok_s: float, ttft: float) -> dict:
        levels = [
            {"concurrency": 1, "users": 1, "partial": False, "foreign_cpu": 0.01,
             "summary": {"output_tok_s": tok_s / 4, "ttft_p50_s": ttft / 4}},
            {"concurrency": 8, "users": 8, "partial": False, "foreign_cpu": 0.01,
             "summary": {"output_tok_s": tok_s, "ttft_p50_s": ttft}},
        ]  # fmt: skip
        state = (status or {}).get(name, "ok")
        return {"step": name, "status": state, "message": state, "levels": levels}

    return {
        "meta": {"commit": commit, "dirty": False, "finished_at": commit,
                 "workload": {"sha256": "w1"}, "machine": MACHINE},
        "config": {"profile": {"name": "quick"}, "dtype": "float32"},
        "steps": [step(name, *v) for name, v in values.items()],
    }  # fmt: skip


def jittered_history() -> list[dict]:
    """Six summary lines: every metric of every step moves by JITTER[i], run i."""
    lines = []
    for i, factor in enumerate(JITTER):
        values = {s: (tok * factor, ttft / factor) for s, (tok, ttft) in BASE.items()}
        lines.append(history.summary_line(results(values, f"{i:07d}aaaa")))
    return lines


def verdicts(changes: list[regression.Change]) -> dict[tuple[str, str, str], str]:
    return {(c.step, c.level, c.metric): c.verdict for c in changes}


# ---------------------------------------------------------------- the noise band


def test_band_is_spread_over_median_of_the_last_window():
    assert regression.noise_band([9.0, 10.0, 11.0, 10.0]) == pytest.approx(0.2)
    # only the last WINDOW values count: an old outlier ages out
    old = [100.0] + [10.0, 10.5] * (regression.WINDOW // 2)
    assert regression.noise_band(old) == pytest.approx(0.5 / 10.25)
    assert regression.noise_band([10.0, 12.0]) is None  # fewer than MIN_RUNS
    assert regression.noise_band([]) is None


def test_a_busy_level_is_left_out_of_the_band():
    past = jittered_history()
    past[1]["steps"]["step3_batching"]["levels"]["8"]["output_tok_s"] = 3.0  # a neighbour ran
    past[1]["steps"]["step3_batching"]["levels"]["8"]["foreign_cpu"] = 0.6
    values = regression._band_values(past, "step3_batching", "8", "output_tok_s")
    assert len(values) == 5 and min(values) > 25


# ---------------------------------------------------------------- flagging


def test_a_planted_regression_is_flagged_and_jitter_is_not():
    past = jittered_history()
    last = {s: past[-1]["steps"][s]["levels"]["8"] for s in BASE}
    now = {
        "step1_central_loader": (BASE["step1_central_loader"][0] * 1.02, 2.0),  # +7% vs last
        "step3_batching": (last["step3_batching"]["output_tok_s"] * 0.6, 1.0),  # -40%
        "step4_mock_kv": (32.0, last["step4_mock_kv"]["ttft_p50_s"] * 2),  # TTFT doubles
    }
    current = history.summary_line(results(now, "bbbbbbbccc"))
    found = verdicts(regression.compare(past, current))
    assert found[("step3_batching", "8", "output_tok_s")] == "regression"
    assert found[("step4_mock_kv", "8", "ttft_p50_s")] == "regression"  # higher is worse
    assert found[("step1_central_loader", "8", "output_tok_s")] == ""
    assert found[("step3_batching", "8", "ttft_p50_s")] == ""
    # concurrency 1 moves with concurrency 8 in these runs; nothing else moved beyond jitter
    flagged = {(step, metric) for (step, _, metric), v in found.items() if v}
    assert flagged == {("step3_batching", "output_tok_s"), ("step4_mock_kv", "ttft_p50_s")}


def test_a_faster_run_beyond_the_band_is_an_improvement():
    past = jittered_history()
    now = {s: (tok * 1.5, ttft / 2) for s, (tok, ttft) in BASE.items()}
    found = verdicts(regression.compare(past, history.summary_line(results(now, "c" * 10))))
    assert found[("step3_batching", "8", "output_tok_s")] == "improvement"
    assert found[("step3_batching", "8", "ttft_p50_s")] == "improvement"


def test_runs_of_another_machine_class_are_set_aside():
    """The same "AMD EPYC" with 2 cores, once with AVX2 only: not comparable."""
    past = jittered_history()
    avx2 = json.loads(json.dumps(past[0]))
    avx2["machine_class"] = "amd-zen3-avx2-2c"
    assert avx2["cpu_model"] == past[0]["cpu_model"] and avx2["cores"] == past[0]["cores"]
    current = history.summary_line(results(BASE, "d" * 10))
    assert regression.comparable([*past, avx2], current) == past


def test_a_line_of_unknown_class_compares_with_nothing():
    past = jittered_history()
    old = json.loads(json.dumps(past[0]))
    old["machine_class"] = "unknown"  # recorded before the class was
    current = history.summary_line(results(BASE, "d" * 10))
    assert regression.comparable([old, *past], current) == past
    unknown_now = {**current, "machine_class": "unknown"}
    assert regression.comparable([old, *past], unknown_now) == []


# ---------------------------------------------------------------- floors over history


def test_floor_ratio_matches_floors_py():
    run = results({"step1_central_loader": (10.0, 2.0), "step3_batching": (27.0, 0.9),
                   "step4_mock_kv": (30.0, 0.3)}, "e" * 10)  # fmt: skip
    line = history.summary_line(run)
    for key in FLOORS:
        ratio = regression.floor_ratio(line, key)
        (verdict,) = floors.check_floors(run, {key: 0})
        assert verdict.message.startswith(f"{ratio:.2f} ")
    tok_key, ttft_key = FLOORS
    assert regression.floor_ratio(line, tok_key) == pytest.approx(2.7)
    assert regression.floor_ratio(line, ttft_key) == pytest.approx(3.0)
    at_1 = "step3_batching/step1_central_loader output_tok_s at concurrency 1"
    assert regression.floor_ratio(line, at_1) == pytest.approx(2.7)


def test_floor_ratio_is_a_gap_where_floors_py_would_not_pass_a_number():
    refused = results(BASE, "f" * 10, status={"step1_central_loader": "refused"})
    line = history.summary_line(refused)
    key = next(iter(FLOORS))
    assert regression.floor_ratio(line, key) is None
    assert floors.check_floors(refused, {key: 0})[0].outcome == "fail"
    del line["steps"]["step1_central_loader"]
    assert regression.floor_ratio(line, key) is None
    assert regression.floor_ratio(line, "not a floor key") is None


def test_floor_ratio_of_another_workload_is_a_gap():
    """A floor scoped to one workload (`... on grounded`) charts only that workload's runs, as
    floors.py checks it only there."""
    line = history.summary_line(results(BASE, "9" * 10))
    assert line["workload"] == "default"
    key = next(iter(FLOORS))
    assert regression.floor_ratio(line, key) is not None
    assert regression.floor_ratio(line, key + " on grounded") is None
    assert regression.floor_ratio({**line, "workload": "grounded"}, key + " on grounded") == (
        regression.floor_ratio(line, key)
    )


def test_floor_series_over_the_history():
    series = [regression.floor_ratio(line, next(iter(FLOORS))) for line in jittered_history()]
    assert series == pytest.approx([3.0] * len(JITTER))  # both steps move together


# ---------------------------------------------------------------- files and the command


def write_inputs(tmp_path: Path, past: list[dict], now: dict) -> tuple[Path, Path, Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results(now, "1234567abc")))
    history_file = tmp_path / "history.jsonl"
    history_file.write_text("".join(json.dumps(line) + "\n" for line in past))
    floors_file = tmp_path / "floors.json"
    floors_file.write_text(json.dumps(FLOORS))
    return run_dir, history_file, floors_file


def test_write_draws_a_png_per_step_and_the_floors_and_flags_in_the_summary(tmp_path):
    now = dict(BASE, step3_batching=(BASE["step3_batching"][0] * 0.55, 1.0))
    run_dir, history_file, floors_file = write_inputs(tmp_path, jittered_history(), now)
    text = regression.write(run_dir, history_file, floors_file, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == sorted([*(f"{s}.png" for s in BASE), "floors.png"])
    for png in (tmp_path / "out").glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "out" / "summary.md").read_text() == text
    assert "6 comparable runs" in text and "2 changes, 2 regressions" in text
    row = next(r for r in text.splitlines() if r.startswith("| step3_batching | 8 | out tok/s"))
    assert "**regression**" in row and "-" in row.split("|")[6]


@pytest.mark.parametrize("kept", [0, 1])
def test_an_empty_or_one_run_history_draws_and_says_the_band_is_unknown(tmp_path, kept):
    run_dir, history_file, floors_file = write_inputs(tmp_path, jittered_history()[:kept], BASE)
    text = regression.write(run_dir, history_file, floors_file, tmp_path / "out")
    assert "band unknown" in text and "**regression**" not in text
    assert f"unknown ({kept} of {regression.MIN_RUNS} runs)" in text
    assert (tmp_path / "out" / "step3_batching.png").read_bytes().startswith(PNG_MAGIC)
    assert ("No comparable runs" in text) == (kept == 0)


def test_a_step_that_was_not_ok_is_named_in_the_summary():
    run = results(BASE, "9" * 10, status={"step4_mock_kv": "refused"})
    text = regression.summary(jittered_history(), history.summary_line(run), FLOORS, 0, "h")
    assert "Not ok in this run: step4_mock_kv (refused)." in text
    ok = regression.summary(
        jittered_history(), history.summary_line(results(BASE, "9")), {}, 0, "h"
    )
    assert "Not ok" not in ok


def test_a_missing_history_file_is_an_empty_history(tmp_path):
    run_dir, _, floors_file = write_inputs(tmp_path, [], BASE)
    text = regression.write(run_dir, tmp_path / "absent.jsonl", floors_file, tmp_path / "out")
    assert "No comparable runs" in text


def test_the_command_prints_the_summary_and_exits_0_even_on_a_regression(tmp_path):
    now = dict(BASE, step3_batching=(BASE["step3_batching"][0] * 0.5, 1.0))
    run_dir, history_file, floors_file = write_inputs(tmp_path, jittered_history(), now)
    out = tmp_path / "charts"
    args = ["--results", str(run_dir), "--history", str(history_file), "--floors", str(floors_file)]
    cmd = [sys.executable, "-m", "bench", "regression", *args, "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "**regression**" in done.stdout and (out / "summary.md").exists()
