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
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.provenance import git_facts, library_versions, machine_facts
from bench.servers import ROOT, StepServer

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


# ---------------------------------------------------------------- what every tool does around it


@contextmanager
def target(
    url: str, step: str, tool: str, ready_s: float = 300
) -> Iterator[tuple[str, StepServer | None]]:
    """The server a measurement runs against: the one at `url`, or else `step` started for it
    (float32, its log in a new temporary folder) and stopped after, whatever happens."""
    if url:
        yield url.rstrip("/"), None
        return
    log = Path(tempfile.mkdtemp(prefix=f"{tool}-")) / f"{step}.log"
    print(f"[{tool}] starting {step} (log: {log})", flush=True)
    server = StepServer(step, "float32", log)
    try:
        server.wait_ready(ready_s)
        yield server.url, server
    finally:
        server.stop()


def finish(
    tool: str, argv: list[str], table: str, name: str, entries: Entries, config: dict
) -> None:
    """Prints the tool's table and, with `--publish NAME`, publishes the run under the command
    that made it (`python -m bench.TOOL ARGS`)."""
    print(table)
    if name:
        command = f"python -m bench.{tool} " + " ".join(argv)
        folder = publish_measurement(name, entries, table, command, config)
        print(f"[{tool}] published {folder}", flush=True)
