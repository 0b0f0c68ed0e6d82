"""`python -m bench publish RESULTS_DIR`: put a run's table and charts where readers look.

Copies results.json and the PNG charts into bench/charts/<name>/ and writes its table.md from
the results (so a note the report learned since the run is in it), where the name is
the profile (`full`), or the profile and the workload for a workload other than the default
(`full-decode`), then rewrites the part of each README between `<!-- bench:<name>:start -->` and
`<!-- bench:<name>:end -->` (appending the section if it has none): the top README gets the
whole table and the charts; each step's README gets its own rows next to the previous step's,
so the step's gain is on its page.

A figure in prose names the cell it comes from, and `python -m bench publish --refresh` (and
every publish) rewrites its text from that run's results.json, so prose cannot drift from its
table (`--check`, and tests/test_readme_figures.py, also regenerate every section and table.md
and fail on one that differs):

    <!-- bench:fig full step3_batching@16 output_tok_s .1f -->30.1<!-- /bench -->
    <!-- bench:fig full step3_batching@16/step1_central_loader@16 output_tok_s -->2.8<!-- /bench -->

The fields: the run (a folder under bench/charts), a cell (the step as the run names it, `@`,
the concurrency level) or a ratio of two cells (`/`), the metric (a key of the level's summary
or of the level: `output_tok_s`, `ttft_p50_s`, `error_rate`, `errors`, `peak_rss_mb`, or a
count by status, `statuses.200`; a `_ms` name reads the `_s` one in milliseconds; for a
speculating step `acceptance`, the share of drafted tokens kept, and `tokens_per_verification`,
as the tables count it), and a Python
format spec (default `.1f`; `.0%` for a rate as a percentage). The unit or the `x` of a ratio
stays outside the marker, in the prose.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from bench.report import COLUMNS, markdown, table_row, tokens_per_verification
from bench.servers import ROOT

CHARTS = ("throughput.png", "latency.png", "ttft.png", "curves.png")
# Figures computed from a speculating step's counts, with the one meaning the tables give them.
DERIVED = {
    "acceptance": lambda spec: spec["accepted"] / spec["drafted"],
    "tokens_per_verification": tokens_per_verification,
}


def publish(results_dir: Path, root: Path = ROOT) -> list[Path]:
    """Returns the READMEs it rewrote."""
    results = json.loads((results_dir / "results.json").read_text())
    profile = published_name(results)
    dest = root / "bench" / "charts" / profile
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", *CHARTS):
        if (results_dir / name).exists():
            shutil.copyfile(results_dir / name, dest / name)
    table = markdown(results)  # the results as the report reads them now, notes included
    (dest / "table.md").write_text(table)
    written = []
    for page, section in sections(results, table, root).items():
        _rewrite(root / page, profile, section)
        written.append(root / page)
    refreshed = refresh_figures(root)
    return written + [path for path in refreshed if path not in written]


def sections(results: dict, table: str, root: Path = ROOT, name: str = "") -> dict[str, str]:
    """What a publish writes between a run's start and end markers, by page: the top README
    gets the whole table and the charts, each step's README its rows next to the step before.
    `name` is the run's folder under bench/charts (default: where a publish puts it)."""
    profile = name or published_name(results)
    link = f"bench/charts/{profile}"
    header, rows = _split(table)
    written = {"README.md": _top_section(table, link, profile)}
    steps = [entry["step"] for entry in results["steps"]]
    for i, step in enumerate(steps):
        if not (root / step / "README.md").exists():
            continue
        shown = [s for s in (steps[i - 1] if i else None, step) if s]
        mine = [r for r in rows if _row_step(r) in shown]
        written[f"{step}/README.md"] = _step_section(header, mine, f"../{link}", profile, shown)
    return written


SECTION = re.compile(
    r"<!-- bench:(?P<run>[\w-]+):start -->\n(?P<text>.*?)\n<!-- bench:(?P=run):end -->", re.DOTALL
)


def stale_sections(root: Path = ROOT) -> list[str]:
    """Each generated section, and each run's table.md, that is not what the run's results.json
    gives now, as `page: run` (with the reason when it is not an edit): a hand edit inside a
    section, a section deleted from a page its run writes, a section whose run folder is gone, a
    table left from another run. A run with no section in the top README is archived: only its
    table.md is checked."""
    stale = []
    for where, run, now, expected in _generated(root):
        if expected is None:
            stale.append(f"{where}: {run} (no bench/charts/{run}/results.json)")
        elif now is None and not where.endswith("table.md"):
            stale.append(f"{where}: {run} (section missing)")
        elif not expected:
            stale.append(f"{where}: {run} (the run has no rows for this page)")
        elif now != expected:
            stale.append(f"{where}: {run}")
    return stale


def refresh_sections(root: Path = ROOT) -> list[Path]:
    """Rewrites each run's table.md, and the sections of each run the top README shows, from the
    run's results.json under bench/charts; returns the files it changed."""
    changed = []
    for where, run, now, expected in _generated(root):
        if not expected or now == expected:  # a gone run, a page it has no rows for: by hand
            continue
        if where.endswith("table.md"):
            (root / where).write_text(expected)
        else:
            _rewrite(root / where, run, expected)
        changed.append(root / where)
    return changed


def _generated(root: Path):
    """What a publish writes, against what is there: (file, run, its text now or None, the text
    the run's results.json gives or None when the run's folder is gone), for each run's table.md
    and, for a run the top README shows, each of its sections (a page the run has no rows for
    expects nothing, so a section left there differs)."""
    for run, results, pages in _published(root):
        if results is None:
            for where, text in pages.items():
                yield where, run, text, None
            continue
        table = markdown(results)
        written = root / "bench" / "charts" / run / "table.md"
        now = written.read_text() if written.exists() else None
        yield written.relative_to(root).as_posix(), run, now, table
        if "README.md" not in pages:
            continue
        expected = sections(results, table, root, name=run)
        for where in sorted(expected.keys() | pages.keys()):
            yield where, run, pages.get(where), expected.get(where, "")


def _published(root: Path):
    """Each bench run under bench/charts, or named by a section, as (folder name, its
    results.json or None when the folder is gone, {page: its section's text})."""
    found: dict[str, dict[str, str]] = {}
    for page in documents(root):
        where = page.relative_to(root).as_posix()
        for match in SECTION.finditer(page.read_text()):
            found.setdefault(match["run"], {})[where] = match["text"]
    charts = root / "bench" / "charts"
    for run in sorted({path.parent.name for path in charts.glob("*/results.json")} | set(found)):
        path = charts / run / "results.json"
        results = json.loads(path.read_text()) if path.exists() else None
        pages = found.get(run, {})
        if results is not None and "profile" not in results.get("config", {}) and not pages:
            continue  # not a bench run (step 9's multi-tenant run, ...): its own tool writes it
        yield run, results, pages


def published_name(results: dict) -> str:
    """The profile, and the workload unless it is the default: `full`, `full-decode`. A run of
    each workload has its own folder under bench/charts and its own README sections."""
    profile = results["config"]["profile"]["name"]
    workload = (results["meta"].get("workload") or {}).get("name", "default")
    return profile if workload == "default" else f"{profile}-{workload}"


def _split(table: str) -> tuple[list[str], list[str]]:
    """The lines above the table, and the table's body rows."""
    lines = table.splitlines()
    start = lines.index(table_row(COLUMNS))
    header = [line for line in lines[:start] if line.strip()]
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append(line)
    return header, body


def _row_step(row: str) -> str:
    return row.split("|")[1].strip()


def _top_section(table: str, link: str, profile: str) -> str:
    images = "\n".join(f"![{name[:-4]}]({link}/{name})" for name in CHARTS)
    return f"{table.rstrip()}\n\n{images}\n\nThe run's files: [`{link}/`]({link}/) ({profile})."


def _step_section(header, rows, link, profile, shown) -> str:
    table = [table_row(COLUMNS), table_row(["---"] * len(COLUMNS)), *rows]
    compared = " next to " + shown[0] if len(shown) == 2 else ""
    return "\n".join(
        [
            *header,
            "",
            f"This step{compared}, from one `{profile}` run of every step:",
            "",
            *table,
            "",
            f"Every step, the charts and the footnotes: [`{link}/table.md`]({link}/table.md).",
            "",
            f"![throughput by step]({link}/throughput.png)",
        ]
    )


def _rewrite(readme: Path, profile: str, section: str) -> None:
    start, end = f"<!-- bench:{profile}:start -->", f"<!-- bench:{profile}:end -->"
    text = readme.read_text()
    block = f"{start}\n{section}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        profile, _, workload = profile.partition("-")
        title = f"{profile} profile" + (f", {workload} workload" if workload else "")
        text = _before_try_it(text, f"## Bench ({title})\n\n{block}\n")
    readme.write_text(text)


def _before_try_it(text: str, section: str) -> str:
    """A new section goes last, but before a step's closing `## Try it`, which stays last."""
    at = text.find(TRY_IT)
    if at < 0:
        return f"{text.rstrip()}\n\n{section}"
    return f"{text[: at + 1]}{section}\n{text[at + 1 :]}"


TRY_IT = "\n## Try it\n"


# A figure's text holds no `<`, so a marker's opening quoted in prose never reaches a later close.
FIGURE = re.compile(r"<!-- bench:fig (?P<spec>[^>]*?) -->(?P<text>[^<]*)<!-- /bench -->")


class FigureError(ValueError):
    """A marker that names a run, step, level or metric its results file does not have."""


def documents(root: Path = ROOT) -> list[Path]:
    """Every page a reader reads: the READMEs (top, steps, their sub-folders) and docs/."""
    found = [root / "README.md", *root.glob("*/README.md"), *root.glob("*/*/README.md")]
    found += root.glob("docs/*.md")
    visible = [p for p in found if p.exists() and not _hidden(p.relative_to(root))]
    return sorted(set(visible))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def refresh_figures(root: Path = ROOT) -> list[Path]:
    """Rewrites every marker's text from its run; returns the pages it changed."""
    runs: dict[str, dict] = {}
    changed = []
    for page in documents(root):
        text = page.read_text()
        new = FIGURE.sub(lambda m: _marker(m["spec"], figure(m["spec"], root, runs)), text)
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


def stale_figures(root: Path = ROOT) -> list[str]:
    """Each marker whose text is not what its run says, as `page: spec: text != value`."""
    runs: dict[str, dict] = {}
    stale = []
    for page in documents(root):
        for match in FIGURE.finditer(page.read_text()):
            value = figure(match["spec"], root, runs)
            if match["text"] != value:
                where = page.relative_to(root).as_posix()
                stale.append(f"{where}: {match['spec']}: {match['text']!r} != {value!r}")
    return stale


def figure(spec: str, root: Path = ROOT, runs: dict[str, dict] | None = None) -> str:
    """The text a marker's spec stands for: `RUN CELL[/CELL] METRIC [FORMAT]`, or `RUN commit`
    and `RUN machine` for the run's short commit and machine class, so prose that names the run
    follows it when it is published again."""
    words = spec.split()
    if len(words) == 2 and words[1] in RUN_FACTS:
        return RUN_FACTS[words[1]](_run(words[0], root, {} if runs is None else runs), spec)
    if len(words) not in (3, 4):
        raise FigureError(
            f"bench:fig {spec!r}: want RUN STEP@LEVEL[/STEP@LEVEL] METRIC [FORMAT], "
            "RUN commit or RUN machine"
        )
    run, cells, metric, form = (*words, ".1f")[:4]
    results = _run(run, root, {} if runs is None else runs)
    values = [_cell(results, cell, metric, spec) for cell in cells.split("/")]
    if len(values) > 2:
        raise FigureError(f"bench:fig {spec!r}: a ratio is of two cells")
    value = values[0] / values[1] if len(values) == 2 else values[0]
    return format(value, form)


def _commit(results: dict, spec: str) -> str:
    meta = results.get("meta", {})
    if not meta.get("commit"):
        raise FigureError(f"bench:fig {spec!r}: the run records no commit")
    return meta["commit"][:7] + (" (dirty)" if meta.get("dirty") else "")


def _machine(results: dict, spec: str) -> str:
    machine = results.get("meta", {}).get("machine", {}).get("machine_class")
    if not machine:
        raise FigureError(f"bench:fig {spec!r}: the run records no machine class")
    return str(machine)


RUN_FACTS = {"commit": _commit, "machine": _machine}


def _marker(spec: str, text: str) -> str:
    return f"<!-- bench:fig {spec} -->{text}<!-- /bench -->"


def _run(name: str, root: Path, runs: dict[str, dict]) -> dict:
    if name not in runs:
        path = root / "bench" / "charts" / name / "results.json"
        if not path.exists():
            raise FigureError(f"bench:fig names run {name!r}, but {path} does not exist")
        runs[name] = json.loads(path.read_text())
    return runs[name]


def _cell(results: dict, cell: str, metric: str, spec: str) -> float:
    step, _, level = cell.partition("@")
    entry = next((e for e in results["steps"] if e["step"] == step), None)
    found = entry and next((v for v in entry["levels"] if str(v["concurrency"]) == level), None)
    if not found:
        raise FigureError(f"bench:fig {spec!r}: the run has no {step} at {level or '?'} users")
    summary = found["summary"]
    spec_counts = found.get("speculation")
    if metric in DERIVED and spec_counts and spec_counts.get("verifications"):
        return DERIVED[metric](spec_counts)
    for source in (found, summary):  # the level's own keys (classes.stream...), its summary's
        value = _lookup(source, metric)
        if value is None and metric.endswith("_ms"):
            seconds = _lookup(source, metric[:-3] + "_s")
            value = None if seconds is None else seconds * 1000
        if value is not None:
            return value
    raise FigureError(f"bench:fig {spec!r}: no metric {metric!r} at {cell}")


def _lookup(source: dict, metric: str) -> float | None:
    """A number by its key, or by a dotted path into a count table (`statuses.429`)."""
    value: object = source
    for key in metric.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None
