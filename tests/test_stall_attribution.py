"""bench.stall's account of a gap: how much of it the engine's iterations covered, read from the
engine's trace put on the client's clock (`otherData.origin_s`); and its rows, published, as the
READMEs' figure markers read them."""

from __future__ import annotations

import pytest

from bench import publish
from bench.measured import publish_measurement
from bench.stall import entries, inside_gap, report
from common.timeline import Iteration, Step, trace

T0 = 1000.0  # time.monotonic() of the first iteration


def iterations(*spans: tuple[float, float, int]) -> list[Iteration]:
    """Iterations at (start after T0, seconds of forward pass, prompt tokens prefilled)."""
    out = []
    for number, (start, forward, prefill) in enumerate(spans, start=1):
        steps = [Step("r1", "decode", 1, 30)] + (
            [Step("r2", "prefill", prefill, 0)] if prefill else []
        )
        phases = {"forward": forward}
        out.append(Iteration(number, T0 + start, phases, steps, budget=256, cpu_s=forward / 4))
    return out


TRACE = trace(iterations((0.0, 0.05, 0), (0.08, 0.2, 120), (0.30, 0.05, 0)), {})


def test_the_trace_names_its_origin_on_the_monotonic_clock():
    assert TRACE["otherData"] == {"clock": "time.monotonic", "origin_s": T0}


def test_a_gap_covered_by_a_long_iteration_is_the_engines_work():
    row = inside_gap(TRACE, T0 + 0.05, 0.25)  # from the end of the first to the third's start
    assert row is not None
    assert row["in_iterations_ms"] == pytest.approx(200.0, abs=0.5)
    assert row["outside_ms"] == pytest.approx(50.0, abs=0.5)
    assert row["longest_iteration"] == {
        "ms": 200.0,
        "cpu_ms": 50.0,
        "sequences": 2,
        "tokens": 121,
        "prefill": 1,
        "decode": 1,
    }


def test_a_gap_between_iterations_is_time_outside_the_engine():
    row = inside_gap(TRACE, T0 + 0.285, 0.01)
    assert row == {"in_iterations_ms": 0.0, "outside_ms": 10.0}


def test_no_account_without_a_trace_or_its_origin():
    assert inside_gap(None, T0, 0.1) is None
    assert inside_gap({"traceEvents": TRACE["traceEvents"]}, T0, 0.1) is None


def row(abuse: str, gap_s: float, quiet_s: float, began: float) -> dict:
    """A row as `measure` returns it, its accounts read from TRACE."""
    return {
        "abuse": abuse, "abuse_s": 1.2, "statuses": [400], "token_s": 0.043,
        "largest_gap_quiet_s": quiet_s, "largest_gap_s": gap_s, "largest_gap_at_s": 0.5,
        "quiet_gap_engine": inside_gap(TRACE, T0, quiet_s),
        "gap_engine": inside_gap(TRACE, T0 + began, gap_s),
    }  # fmt: skip


def test_published_phases_are_read_by_figure_markers(tmp_path):
    rows = [row("big-prompts", 0.079, 0.041, 0.07), row("half-open", 0.096, 0.043, 0.25)]
    table = report(rows)
    found = entries(rows, "step7_real_kv")
    publish_measurement("st", found, table, "python -m bench.stall", {}, root=tmp_path)

    def fig(spec: str) -> str:
        return publish.figure(f"st {spec}", root=tmp_path)

    assert fig("step7_real_kv:big-prompts@3 largest_gap_ms .0f") == "79"
    assert fig("step7_real_kv:half-open@3 largest_gap_ms .0f") == "96"
    assert fig("step7_real_kv:half-open@3 largest_gap_quiet_ms .0f") == "43"
    # the big prompts' gap, 0.07-0.149 s: 0.139 s of it inside the 0.08-0.28 s iteration
    assert fig("step7_real_kv:big-prompts@3 gap_engine.in_iterations_ms") == "69.0"
    assert fig("step7_real_kv:big-prompts@3 gap_engine.outside_ms") == "10.0"
    assert fig("step7_real_kv:big-prompts@3 gap_engine.longest_iteration.ms .0f") == "200"
    with pytest.raises(publish.FigureError):
        fig("step7_real_kv:many-messages@3 largest_gap_ms")  # a phase not run
    assert "| half-open | 96 |" in (tmp_path / "bench/charts/st/table.md").read_text()
