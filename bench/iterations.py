"""How long an engine's iterations took, by their rows: a chart and a table from a timeline.

    python -m bench.iterations TRACE.json [OUT.png] [--engine NAME]

TRACE is what GET /debug/timeline returns and the bench keeps in a run's `timelines/` (gzipped
or not). Every forward pass of the engine is one "iteration" event with its rows (`tokens`: a
decoding sequence's token, a draft, a prompt token) and its CPU time. The table gives, for each
row count, how many iterations had it and their median and p99 wall time; the chart puts every
iteration's wall time against its rows, the medians joined. On one core an iteration's time grows
with its rows, and every stream in it waits that long for its next token: step 10's decode
engine is read this way. `--engine` picks one engine of a merged trace (step 10's router: a
prefix of its name, `decode` or `prefill`); without it, the first.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

from bench.timeline_chart import engine_traces


def load(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def iterations(trace: dict) -> list[dict]:
    """Each iteration of one engine's trace, in order: rows, wall ms, CPU ms, sequences."""
    events = sorted(
        (e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"].startswith("iteration ")),
        key=lambda e: e["ts"],
    )
    return [
        {
            "rows": e["args"]["tokens"],
            "ms": e["dur"] / 1000,
            "cpu_ms": e["args"].get("cpu_ms"),
            "sequences": e["args"]["sequences"],
        }
        for e in events
    ]


def by_rows(its: list[dict]) -> list[dict]:
    """Per row count: iterations, median and p99 wall ms (nearest rank)."""
    table = []
    for rows in sorted({i["rows"] for i in its}):
        ms = sorted(i["ms"] for i in its if i["rows"] == rows)
        p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)))]
        median = statistics.median(ms)
        table.append({"rows": rows, "n": len(ms), "median_ms": median, "p99_ms": p99})
    return table


def engine(trace: dict, name: str = "") -> tuple[str, dict]:
    """The engine whose name starts with `name` (the first one when empty)."""
    traces = engine_traces(trace)
    for full, one in traces.items():
        if full.startswith(name):
            return full, one
    names = ", ".join(traces) or "one, unnamed"
    raise SystemExit(f"no engine named {name!r} in the trace: {names}")


def draw(its: list[dict], out: Path, title: str = "", max_rows: int = 0) -> None:
    """Every iteration's wall time against its rows, the medians joined. The x axis ends at
    `max_rows`, or by default at the rows of 99% of the iterations: the few big prompt chunks
    of an otherwise idle engine would squeeze the rest into a corner; the legend counts them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(i["rows"] for i in its)
    limit = max_rows or ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))]
    shown = [i for i in its if i["rows"] <= limit]
    table = by_rows(shown)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter([i["rows"] for i in shown], [i["ms"] for i in shown], s=8, alpha=0.3,
               label=f"iteration ({len(its) - len(shown)} more above {limit} rows)")  # fmt: skip
    ax.plot([t["rows"] for t in table], [t["median_ms"] for t in table], "o-", color="#c9893c",
            label="median by rows")  # fmt: skip
    ax.set_xlabel("rows in the iteration (decoding tokens + drafts + prompt tokens)")
    ax.set_ylabel("wall time, ms")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "iterations by rows")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.iterations", description=__doc__)
    parser.add_argument("trace", type=Path)
    parser.add_argument("out", type=Path, nargs="?", help="the chart (PNG); none: only the table")
    parser.add_argument("--engine", default="", help="a prefix of the engine's name")
    parser.add_argument("--max-rows", type=int, default=0, help="rows up to this count only")
    args = parser.parse_args(argv)
    name, trace = engine(load(args.trace), args.engine)
    its = iterations(trace)
    print(f"{args.trace} {name}: {len(its)} iterations")
    print("| rows | iterations | median ms | p99 ms |\n| --- | --- | --- | --- |")
    for t in by_rows(its):
        if not args.max_rows or t["rows"] <= args.max_rows:
            print(f"| {t['rows']} | {t['n']} | {t['median_ms']:.0f} | {t['p99_ms']:.0f} |")
    if args.out:
        draw(its, args.out, f"{args.trace.name} {name}".strip(), args.max_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
