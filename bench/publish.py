"""`python -m bench publish RESULTS_DIR`: put a run's table and charts where readers look.

Copies table.md, results.json and the PNG charts into bench/charts/<name>/, where the name is
the profile (`full`), or the profile and the workload for a workload other than the default
(`full-decode`), then rewrites the part of each README between `<!-- bench:<name>:start -->` and
`<!-- bench:<name>:end -->` (appending the section if it has none): the top README gets the
whole table and the charts; each step's README gets its own rows next to the previous step's,
so the step's gain is on its page.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from bench.report import COLUMNS, table_row
from bench.servers import ROOT

CHARTS = ("throughput.png", "latency.png", "ttft.png", "curves.png")


def publish(results_dir: Path, root: Path = ROOT) -> list[Path]:
    """Returns the READMEs it rewrote."""
    results = json.loads((results_dir / "results.json").read_text())
    profile = published_name(results)
    dest = root / "bench" / "charts" / profile
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("table.md", "results.json", *CHARTS):
        if (results_dir / name).exists():
            shutil.copyfile(results_dir / name, dest / name)
    table = (results_dir / "table.md").read_text()
    header, rows = _split(table)
    link = dest.relative_to(root).as_posix()

    top = root / "README.md"
    _rewrite(top, profile, _top_section(table, link, profile))
    written = [top]
    steps = [entry["step"] for entry in results["steps"]]
    for i, step in enumerate(steps):
        readme = root / step / "README.md"
        if not readme.exists():
            continue
        shown = [s for s in (steps[i - 1] if i else None, step) if s]
        mine = [r for r in rows if _row_step(r) in shown]
        _rewrite(readme, profile, _step_section(header, mine, f"../{link}", profile, shown))
        written.append(readme)
    return written


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
        text = f"{text.rstrip()}\n\n## Bench ({title})\n\n{block}\n"
    readme.write_text(text)
