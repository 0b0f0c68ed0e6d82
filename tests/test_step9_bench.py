"""The step 9 policy comparison's bench parts that need no server: the multi-tenant workload,
the hit-rate arithmetic, the table, publishing into the step's README, the command line."""

from __future__ import annotations

import pytest

from bench import cli, multitenant
from bench.records import Record
from bench.stats import summarise


def test_conversations_stay_with_one_tenant_and_users_spread_over_tenants():
    workload = multitenant.load_workload()
    assert len(workload.tenants) >= 4 and workload.turns >= 2
    assert len({t.system_prompt for t in workload.tenants}) == len(workload.tenants)
    assert all(len(t.system_prompt) > 1000 for t in workload.tenants)  # long: ~250 tokens
    tenant, questions = workload.conversation(user=0, index=0)
    assert len(questions) == workload.turns and set(questions) <= set(tenant.questions)
    assert len(set(questions)) == len(questions)  # follow-ups, not the same question again
    firsts = {workload.conversation(user, 0)[0].id for user in range(len(workload.tenants))}
    assert len(firsts) == len(workload.tenants)  # at the start, every tenant is talking
    assert workload.conversation(3, 2) == workload.conversation(3, 2)  # the same in every run


def test_hit_rate_and_split_are_deltas_over_the_load():
    before = {
        "a": {"hit": 100.0, "queried": 200.0, "requests": 5.0},
        "b": {"hit": 0.0, "queried": 50.0, "requests": 1.0},
    }
    after = {
        "a": {"hit": 400.0, "queried": 600.0, "requests": 8.0},
        "b": {"hit": 100.0, "queried": 350.0, "requests": 2.0},
    }
    cache = multitenant.cache_summary(before, after)
    assert cache["hit_rate"] == 400 / 700  # (300 + 100) / (400 + 300)
    assert cache["split"] == [0.75, 0.25]
    nothing = multitenant.cache_summary(before, before)
    assert nothing["hit_rate"] is None and nothing["split"] == [None, None]


def fake_results() -> dict:
    record = Record(0, 0, "library-t0", 1000.0, 200, e2e_s=2.0, ttft_s=0.5, output_tokens=10)
    ok = {
        "config": "step9:cache_aware",
        "status": "ok",
        "summary": summarise([record]),
        "cache": {"hit_rate": 0.8, "split": [0.5, 0.5]},
        "other_cpu": 0.02,
    }
    refused = {"config": "step9:round_robin", "status": "refused", "message": "answers differ"}
    return {
        "settings": {
            "users": 8,
            "run_time_s": 60.0,
            "stop_timeout_s": 60.0,
            "max_tokens": 64,
            "replicas": 2,
        },
        "meta": {"commit": "abcdef1234567", "machine": {"cpu_model": "cpu", "cores": 2}},
        "workload": {"version": 1},
        "configs": [ok, refused],
    }


def test_the_table_has_one_row_per_configuration():
    table = multitenant.markdown(fake_results())
    rows = [line for line in table.splitlines() if line.startswith("| step9")]
    assert len(rows) == 2
    assert "| 80% |" in rows[0] and "| 500 |" in rows[0] and "50% / 50%" in rows[0]
    assert "answers differ" in rows[1]


def test_the_baseline_runs_the_engine_the_replicas_run(tmp_path, monkeypatch):
    """One change at a time: the engine alone against the router over replicas of it."""
    from step9_router import replicas

    assert multitenant.ENGINE == replicas.ENGINE
    monkeypatch.setattr(multitenant, "ProcessServer", lambda *args, **kw: args)
    settings = multitenant.Settings()
    baseline = multitenant.start(multitenant.BASELINE, settings, tmp_path)
    assert baseline[1][1:3] == ["-m", replicas.ENGINE]
    routed = multitenant.start("step9:cache_aware", settings, tmp_path)
    assert routed[1][1:3] == ["-m", "step9_router"]
    assert multitenant.parse_args([]).no_baseline is False
    results = {**fake_results(), "engine": replicas.ENGINE}
    header = multitenant.markdown(results).splitlines()[0]
    assert f"`{replicas.ENGINE}` alone (step8), then step 9 over 2 local" in header


def test_publish_fills_the_readme_between_its_markers(tmp_path):
    out, folder = tmp_path / "run", tmp_path / "step"
    out.mkdir()
    folder.mkdir()
    (out / "table.md").write_text("| a | b |\n")
    start, end = multitenant.MARKERS
    (folder / "README.md").write_text(f"intro\n{start}\nold\n{end}\noutro\n")
    multitenant.publish(out, folder)
    text = (folder / "README.md").read_text()
    assert "old" not in text and "| a | b |" in text and text.startswith("intro")
    assert text.endswith("outro\n") and "![policies](policies.png)" in text
    (folder / "README.md").write_text("no markers\n")
    with pytest.raises(SystemExit):
        multitenant.publish(out, folder)


def test_the_command_is_reached_through_the_bench_cli(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["multitenant", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert "--policies" in shown and "--users" in shown and "--publish" in shown
    with pytest.raises(SystemExit, match="unknown policies"):
        multitenant.main(["--policies", "random"])
