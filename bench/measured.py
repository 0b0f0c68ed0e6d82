"""A measurement's numbers in the bench's results format, so that READMEs quote them.

The measurement tools (`bench.live_cost`, `bench.stall`, `bench.transfer`) are not bench runs,
but what they print is as worth quoting. `publish_measurement` writes bench/charts/NAME/
results.json in the shape `bench.publish.figure` reads (entries named like steps, each at
levels) with the commit, machine and library versions, and a table.md that names the command,
commit and machine above the tool's own table:

    <!-- bench:fig NAME ENTRY@LEVEL METRIC [FORMAT] -->text<!-- /bench -->
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench.provenance import git_facts, library_versions, machine_facts
from bench.servers import ROOT

# entry name -> level (users, streams, ...) -> the level's fields: `summary` (a metric name ->
# number, or a dict of them that a dotted metric name reads) and any more the tool keeps
Entries = dict[str, dict[int, dict]]


def valid_name(name: str) -> bool:
    """A folder name under bench/charts: no path, nothing a shell or a marker would split."""
    return re.fullmatch(r"[A-Za-z0-9._-]+", name) is not None


def measurement(entries: Entries, command: str, config: dict) -> dict:
    """The run as results.json holds it: schema, meta (commit, machine, versions, command),
    config and one `steps` entry for each entry, its levels in order."""
    meta = {**git_facts(), "machine": machine_facts(), "versions": library_versions(),
            "command": command}  # fmt: skip
    steps = [
        {"step": name, "status": "ok", "levels": [_level(n, levels[n]) for n in sorted(levels)]}
        for name, levels in entries.items()
    ]
    return {"schema": 1, "meta": meta, "config": config, "steps": steps}


def _level(n: int, fields: dict) -> dict:
    if "summary" not in fields:
        raise ValueError(f"level {n}: its fields need a summary")
    return {"concurrency": n, "users": n, **fields}


def publish_measurement(
    name: str, entries: Entries, table: str, command: str, config: dict, root: Path = ROOT
) -> Path:
    """Writes bench/charts/NAME/results.json and table.md; returns the folder."""
    if not valid_name(name):
        raise ValueError(f"{name!r} is not a folder name under bench/charts")
    data = measurement(entries, command, config)
    folder = root / "bench" / "charts" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (folder / "table.md").write_text(_heading(data["meta"]) + table.rstrip() + "\n")
    return folder


def _heading(meta: dict) -> str:
    return (
        f"`{meta['command']}` at {(meta['commit'] or 'unknown')[:7]}"
        f"{' (dirty tree)' if meta['dirty'] else ''}, machine "
        f"`{meta['machine']['machine_class']}`.\n\n"
    )
