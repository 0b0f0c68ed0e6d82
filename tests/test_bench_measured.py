"""bench.measured: a measurement tool's numbers in the bench's results format, read by the
READMEs' figure markers, with the run's command, commit and machine above its table."""

from __future__ import annotations

import json

import pytest

from bench import publish
from bench.measured import measurement, publish_measurement, valid_name


def test_entries_become_steps_at_levels_in_order() -> None:
    entries = {"a": {4: {"summary": {"x": 2.0}}, 1: {"summary": {"x": 1.0}, "rounds": []}}}
    data = measurement(entries, "python -m bench.tool", {"k": 1})
    assert data["schema"] == 1 and data["config"] == {"k": 1}
    assert data["meta"]["command"] == "python -m bench.tool"
    assert {"commit", "dirty", "machine", "versions"} <= set(data["meta"])
    (step,) = data["steps"]
    assert step["step"] == "a" and step["status"] == "ok"
    assert [level["concurrency"] for level in step["levels"]] == [1, 4]
    assert step["levels"][0] == {"concurrency": 1, "users": 1, "summary": {"x": 1.0}, "rounds": []}


def test_a_level_without_a_summary_is_refused() -> None:
    with pytest.raises(ValueError, match="summary"):
        measurement({"a": {1: {"x": 1.0}}}, "cmd", {})


def test_published_numbers_are_what_markers_read(tmp_path) -> None:
    entries = {"s:quiet": {3: {"summary": {"gap_s": 0.0795, "engine": {"outside_ms": 2.5}}}}}
    folder = publish_measurement("m", entries, "| a |\n", "python -m bench.tool", {}, tmp_path)
    assert folder == tmp_path / "bench/charts/m"
    assert publish.figure("m s:quiet@3 gap_ms .0f", root=tmp_path) == "80"
    assert publish.figure("m s:quiet@3 engine.outside_ms", root=tmp_path) == "2.5"
    table = (folder / "table.md").read_text()
    assert table.startswith("`python -m bench.tool` at ") and table.endswith("| a |\n")
    assert json.loads((folder / "results.json").read_text())["steps"][0]["step"] == "s:quiet"


@pytest.mark.parametrize("name", ["../x", "a b", "a/b", ""])
def test_a_name_that_is_not_one_folder_is_refused(tmp_path, name) -> None:
    assert not valid_name(name)
    with pytest.raises(ValueError):
        publish_measurement(name, {}, "", "cmd", {}, tmp_path)
