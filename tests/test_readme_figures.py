"""Every figure in the prose that cites a published run is a marker, recomputed here from the
run's results.json: a README that disagrees with its table fails. The marker syntax and the
rewrite are bench/publish.py's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.publish import (
    FigureError,
    _rewrite,
    documents,
    figure,
    publish,
    refresh_figures,
    refresh_sections,
    stale_figures,
    stale_sections,
)

ROOT = Path(__file__).resolve().parent.parent


def test_every_figure_in_the_docs_agrees_with_its_run():
    assert stale_figures(ROOT) == []


def test_every_generated_section_and_table_is_what_its_run_gives():
    top = (ROOT / "README.md").read_text()
    assert "<!-- bench:full:start -->" in top and "<!-- bench:full-decode:start -->" in top
    assert stale_sections(ROOT) == []


def _published_site(tmp_path: Path, steps=("step2_queue", "step3_batching")) -> Path:
    """A copy of the published full run, published into a tree with a top README and `steps`."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copyfile(ROOT / "bench" / "charts" / "full" / "results.json", results / "results.json")
    for step in steps:
        (tmp_path / step).mkdir()
        (tmp_path / step / "README.md").write_text(f"# {step}\n")
    (tmp_path / "README.md").write_text("# Project\n")
    publish(results, tmp_path)
    return tmp_path


def test_a_deleted_section_a_missing_run_and_an_archived_runs_table_are_caught(tmp_path):
    site = _published_site(tmp_path)
    page = site / "step3_batching" / "README.md"
    page.write_text("# step3_batching\n")
    assert stale_sections(site) == ["step3_batching/README.md: full (section missing)"]
    assert refresh_sections(site) == [page] and stale_sections(site) == []

    stray = site / "docs" / "notes.md"  # a page the run writes no rows to
    stray.parent.mkdir()
    stray.write_text("<!-- bench:full:start -->\nold rows\n<!-- bench:full:end -->\n")
    assert stale_sections(site) == ["docs/notes.md: full (the run has no rows for this page)"]
    assert refresh_sections(site) == [] and "old rows" in stray.read_text()  # left to a person
    stray.unlink()

    charts = site / "bench" / "charts"
    shutil.copytree(charts / "full", charts / "full-1234567")  # archived: a table, no section
    (charts / "full-1234567" / "table.md").write_text("a table from another run\n")
    assert stale_sections(site) == ["bench/charts/full-1234567/table.md: full-1234567"]
    refresh_sections(site)
    assert stale_sections(site) == []

    shutil.rmtree(charts / "full")
    assert stale_sections(site) == [
        f"{where}: full (no bench/charts/full/results.json)"
        for where in ("README.md", "step2_queue/README.md", "step3_batching/README.md")
    ]


def test_an_archived_runs_sections_are_rebuilt_under_its_folder_name(tmp_path):
    """A run kept as `full-1234567` is still a `full` run in its results.json; its sections and
    links are checked as the folder's, not as the current `full` run's."""
    site = _published_site(tmp_path, steps=("step3_batching",))
    charts = site / "bench" / "charts"
    shutil.move(charts / "full", charts / "full-1234567")
    for page in (site / "README.md", site / "step3_batching" / "README.md"):
        text = page.read_text().replace("bench:full:", "bench:full-1234567:")
        page.write_text(text.replace("charts/full/", "charts/full-1234567/"))
    assert "(full-1234567)" not in (site / "README.md").read_text()
    # the sections name the run ("one `full` run", "(full)"): the folder's name is expected
    assert stale_sections(site) == [
        "README.md: full-1234567",
        "step3_batching/README.md: full-1234567",
    ]
    refresh_sections(site)
    assert stale_sections(site) == [] and "(full-1234567)" in (site / "README.md").read_text()


def test_publish_check_exits_1_on_a_stale_section_and_0_on_none(tmp_path, monkeypatch, capsys):
    from bench import cli
    from bench import publish as publish_module

    site = _published_site(tmp_path)
    monkeypatch.setattr(publish_module, "ROOT", site)
    for name in ("stale_figures", "stale_sections", "refresh_figures", "refresh_sections"):
        function = getattr(publish_module, name)
        monkeypatch.setattr(publish_module, name, lambda f=function: f(site))
    assert cli._publish(["--check"]) == 0
    (site / "step2_queue" / "README.md").write_text("# step2_queue\n")
    assert cli._publish(["--check"]) == 1
    assert "step2_queue/README.md: full (section missing)" in capsys.readouterr().out
    assert cli._publish(["--refresh"]) == 0 and cli._publish(["--check"]) == 0


def test_a_hand_edit_in_a_generated_section_or_a_table_from_another_run_is_caught(tmp_path):
    run = ROOT / "bench" / "charts" / "full"
    results = tmp_path / "results"
    results.mkdir()
    shutil.copyfile(run / "results.json", results / "results.json")
    for step in ("step2_queue", "step3_batching"):
        (tmp_path / step).mkdir()
        (tmp_path / step / "README.md").write_text(f"# {step}\n")
    (tmp_path / "README.md").write_text("# Project\n")
    publish(results, tmp_path)
    assert stale_sections(tmp_path) == []

    page = tmp_path / "step3_batching" / "README.md"
    text = page.read_text()
    row = text.index("| step3_batching")
    page.write_text(text[:row] + text[row:].replace("|", "| 1", 2).replace("| 1", "|", 1))
    assert stale_sections(tmp_path) == ["step3_batching/README.md: full"]

    page.write_text(text)
    table = tmp_path / "bench" / "charts" / "full" / "table.md"
    table.write_text(table.read_text().replace("step3_batching", "step3_batched"))
    assert stale_sections(tmp_path) == ["bench/charts/full/table.md: full"]


def test_the_steps_and_the_top_readme_cite_the_published_run_through_markers():
    pages = {p.relative_to(ROOT).as_posix(): p.read_text() for p in documents(ROOT)}
    for page in ["README.md", *(f"{s}/README.md" for s in STEPS_CITING_FULL)]:
        assert "<!-- bench:fig full " in pages[page], f"{page} has no figure marker"


def step_folders() -> list[str]:
    return sorted(p.name for p in ROOT.glob("step*_*") if (p / "README.md").exists())


def test_the_ladder_has_a_line_per_step():
    text = (ROOT / "README.md").read_text()
    ladder = text[text.index("## The ladder") :].split("\n## ")[0]
    steps = step_folders()
    assert len(steps) == 11
    for step in steps:
        assert f"| [`{step}/`]({step}/) |" in ladder, f"the ladder has no line for {step}"


@pytest.mark.parametrize("step", step_folders())
def test_every_step_readme_ends_with_one_experiment_to_try(step):
    text = (ROOT / step / "README.md").read_text()
    last = text[text.rindex("\n## ") + 1 :]
    assert last.startswith("## Try it\n"), f"{step}'s README does not end with Try it"
    assert "python -m bench" in last, f"{step}'s Try it names no bench command"


STEPS_CITING_FULL = [
    "step0_bruteforce",
    "step1_central_loader",
    "step2_queue",
    "step3_batching",
    "step4_mock_kv",
    "step5_observability",
    "step6_backpressure",
]


@pytest.fixture
def site(tmp_path):
    """A scratch root with one run and one page citing it."""
    run = {
        "steps": [
            _step("step1_central_loader", 16, output_tok_s=10.9, ttft_p50_s=14.767, error_rate=0),
            _step(
                "step3_batching",
                16,
                output_tok_s=30.1,
                ttft_p50_s=14.993,
                error_rate=0.15,
                statuses={"200": 34, "429": 6},
            ),
        ]
    }
    charts = tmp_path / "bench" / "charts" / "full"
    charts.mkdir(parents=True)
    (charts / "results.json").write_text(json.dumps(run))
    return tmp_path


def _step(name: str, users: int, **summary) -> dict:
    level = {"concurrency": users, "peak_rss_mb": 2081.4, "summary": summary}
    level["classes"] = {"stream": {"itl_p99_s": 0.6061}}  # a workload's request class
    return {"step": name, "levels": [level]}


def test_a_marker_reads_a_cell_a_ratio_milliseconds_a_percentage_and_a_count(site):
    assert figure("full step3_batching@16 output_tok_s", site) == "30.1"
    assert figure("full step3_batching@16/step1_central_loader@16 output_tok_s", site) == "2.8"
    assert figure("full step3_batching@16 ttft_p50_ms .0f", site) == "14993"
    assert figure("full step3_batching@16 ttft_p50_s .1f", site) == "15.0"
    assert figure("full step3_batching@16 error_rate .0%", site) == "15%"
    assert figure("full step3_batching@16 peak_rss_mb .0f", site) == "2081"
    assert figure("full step3_batching@16 statuses.429 .0f", site) == "6"
    assert figure("full step3_batching@16 classes.stream.itl_p99_ms .0f", site) == "606"


def test_a_speculating_steps_acceptance_and_tokens_per_verification_mean_what_its_table_says(
    site,
):
    """One meaning per figure: the marker's tokens per verification is the table's (kept drafts
    per verification plus the model's own token), computed from the level's counts."""
    from bench.report import tokens_per_verification

    run = json.loads((site / "bench/charts/full/results.json").read_text())
    spec = {"drafted": 500, "accepted": 300, "verifications": 120}
    run["steps"].append(_step("step8_speculative", 1, output_tok_s=50.0))
    run["steps"][-1]["levels"][0]["speculation"] = spec
    (site / "bench/charts/full/results.json").write_text(json.dumps(run))
    assert figure("full step8_speculative@1 acceptance .0%", site) == "60%"
    assert figure("full step8_speculative@1 tokens_per_verification .2f", site) == "3.50"
    assert tokens_per_verification(spec) == 3.5
    assert figure("full step8_speculative@1 speculation.accepted .0f", site) == "300"
    with pytest.raises(FigureError, match="bench:fig"):  # step 3 drafts nothing
        figure("full step3_batching@16 acceptance", site)


def test_a_marker_names_its_runs_commit_and_machine_class(site):
    path = site / "bench/charts/full/results.json"
    run = json.loads(path.read_text())
    run["meta"] = {"commit": "5642c8c7d596b6", "dirty": False}
    run["meta"]["machine"] = {"machine_class": "intel-f6m167-amx-2c"}
    path.write_text(json.dumps(run))
    assert figure("full commit", site) == "5642c8c"
    assert figure("full machine", site) == "intel-f6m167-amx-2c"
    run["meta"]["dirty"] = True
    path.write_text(json.dumps(run))
    assert figure("full commit", site) == "5642c8c (dirty)"


@pytest.mark.parametrize(
    "spec",
    [
        "full commit",  # the scratch run records no commit
        "full machine",  # nor a machine
        "full branch",  # not a fact of the run
        "other step3_batching@16 output_tok_s",  # no such run
        "full step9_router@16 output_tok_s",  # no such step
        "full step3_batching@4 output_tok_s",  # no such level
        "full step3_batching@16 tokens_per_joule",  # no such metric
        "full step3_batching@16 statuses.503",  # no such status
        "full step3_batching@16",  # no metric
        "full a@16/b@16/c@16 output_tok_s",  # a ratio of three
    ],
)
def test_a_marker_naming_what_its_run_lacks_is_an_error_naming_the_marker(site, spec):
    with pytest.raises(FigureError, match="bench:fig"):
        figure(spec, site)


def test_an_edited_digit_is_caught_and_refresh_puts_the_run_back(site):
    page = site / "step3_batching" / "README.md"
    page.parent.mkdir()
    marker = "<!-- bench:fig full step3_batching@16 output_tok_s -->{}<!-- /bench -->"
    page.write_text(f"At 16 users {marker.format('30.1')} tokens/s.\n")
    assert stale_figures(site) == []

    page.write_text(f"At 16 users {marker.format('35.4')} tokens/s.\n")
    (stale,) = stale_figures(site)
    assert stale.startswith("step3_batching/README.md:") and "'35.4' != '30.1'" in stale

    assert refresh_figures(site) == [page]
    assert page.read_text() == f"At 16 users {marker.format('30.1')} tokens/s.\n"
    assert refresh_figures(site) == []  # nothing left to change


def test_a_marker_quoted_in_prose_is_not_a_figure(site):
    page = site / "README.md"
    quoted = "Write `<!-- bench:fig full step3_batching@16 output_tok_s -->` before a figure.\n"
    figure_after = (
        "At 16 users <!-- bench:fig full step3_batching@16 output_tok_s -->30.1<!-- /bench -->.\n"
    )
    page.write_text(quoted + figure_after)
    assert stale_figures(site) == [] and refresh_figures(site) == []


def test_an_edited_digit_in_a_copy_of_the_real_docs_fails_the_check(tmp_path):
    shutil.copytree(ROOT / "bench" / "charts" / "full", tmp_path / "bench" / "charts" / "full")
    page = tmp_path / "step3_batching" / "README.md"
    page.parent.mkdir()
    text = (ROOT / "step3_batching" / "README.md").read_text()
    start = text.index("<!-- bench:fig full step3_batching@64 output_tok_s")
    digit = text.index("-->", start) + 3  # the first character of the figure's text
    edited = "9" if text[digit] != "9" else "8"
    page.write_text(text[:digit] + edited + text[digit + 1 :])
    stale = stale_figures(tmp_path)
    assert len(stale) == 1 and "step3_batching@64 output_tok_s" in stale[0]


def test_a_new_published_section_goes_before_try_it_which_stays_last(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Step 7\n\nText.\n\n## Try it\n\nA knob.\n")
    _rewrite(readme, "full-mixed", "the table")
    text = readme.read_text()
    assert text.index("## Bench (full profile, mixed workload)") < text.index("## Try it")
    assert text.endswith("## Try it\n\nA knob.\n") and "\n\n\n" not in text
    _rewrite(tmp_path / "README.md", "full-mixed", "a newer table")  # replaced in place
    assert readme.read_text().count("## Bench") == 1 and "a newer table" in readme.read_text()
