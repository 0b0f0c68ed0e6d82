"""The schedule as a picture: iterations across, requests down, each cell what the request did.

    python -m bench.timeline_chart TRACE.json OUT.png [--first N] [--iterations N] [--title T]

TRACE is what GET /debug/timeline returns (Chrome Trace Event JSON). Each request is a row, in
order of arrival; each forward pass of the engine a column. A cell says what that request did in
that iteration: waited (arrived, not in the batch yet, or preempted and waiting again), ran a
prefill chunk, decoded one token, stepped on padding (a row of a static batch that had already
finished), or forked from its leader's prompt (n > 1); a red dot marks a preemption. Above, the
sequences in each iteration and the KV blocks in use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KINDS = ["none", "waiting", "prefill", "decode", "padding", "fork", "verify"]
COLOURS = ["#ffffff", "#e8e2c8", "#3b75af", "#58a55c", "#c9893c", "#8e63b5", "#d35f9e"]
LABELS = {
    "waiting": "waiting",
    "prefill": "prefill chunk",
    "decode": "decode",
    "padding": "padding (finished, still in the batch)",
    "fork": "starts from its leader's prompt (n > 1)",
    "verify": "verify drafts",
}


def engine_traces(trace: dict) -> dict[str, dict]:
    """Each engine's own trace, by its name: a trace merged from several engines (step 10's
    router: one process per engine, its iterations on track 0, its requests on 1 and up) split
    back into the two processes the chart reads; a single engine's trace as it is, named ""."""
    engines = trace.get("otherData", {}).get("engines")
    if not engines:
        return {"": trace}
    split = {}
    for pid, name in enumerate(engines, start=1):
        events = [
            {**e, "pid": 1 if e["tid"] == 0 else 2}
            for e in trace["traceEvents"]
            if e["pid"] == pid and not (e["ph"] == "M" and e["name"].startswith("process_"))
        ]
        split[name] = {"traceEvents": events, "displayTimeUnit": "ms"}
    return split


def grid(trace: dict) -> tuple[np.ndarray, list[dict], list[tuple[int, int]], list[str]]:
    """(cells [requests, iterations] of KINDS indexes, the iterations' args, preemptions as
    (row, column), the request names) from a trace."""
    events = trace["traceEvents"]
    iterations = sorted(
        (e for e in events if e["ph"] == "X" and e["name"].startswith("iteration ")),
        key=lambda e: e["ts"],
    )
    column = {e["args"]["iteration"]: i for i, e in enumerate(iterations)}
    names = {e["tid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name" and e["pid"] == 2}  # fmt: skip
    rows = {tid: r for r, tid in enumerate(sorted(names))}
    cells = np.zeros((len(rows), len(iterations)), dtype=np.int8)
    starts = np.array([e["ts"] for e in iterations])
    preempted = []
    for e in events:
        if e["pid"] != 2 or e["tid"] not in rows:
            continue
        row = rows[e["tid"]]
        if e["ph"] == "X" and e["name"] == "queued":
            lo, hi = np.searchsorted(starts, [e["ts"], e["ts"] + e["dur"]])
            cells[row, lo:hi] = KINDS.index("waiting")
        elif e["ph"] == "X" and e["args"].get("iteration") in column:
            cells[row, column[e["args"]["iteration"]]] = KINDS.index(e["args"]["kind"])
        elif e["ph"] == "i" and e["name"] == "preempted" and e["args"]["iteration"] in column:
            preempted.append((row, column[e["args"]["iteration"]]))
    _fill_waits_after_preemption(cells, preempted)
    return cells, [e["args"] for e in iterations], preempted, [names[t] for t in sorted(names)]


def _fill_waits_after_preemption(cells: np.ndarray, preempted: list[tuple[int, int]]) -> None:
    """From a preemption to the request's next step it waits again."""
    for row, col in preempted:
        later = np.nonzero(cells[row, col + 1 :])[0]
        end = col + 1 + (later[0] if len(later) else 0)
        cells[row, col:end] = KINDS.index("waiting")


def draw(trace: dict, out: Path, title: str = "", first: int = 0, count: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cells, args, preempted, _ = grid(trace)
    stop = first + count if count else cells.shape[1]
    cells, args = cells[:, first:stop], args[first:stop]
    seen = np.nonzero(cells.any(axis=1))[0]  # the requests this window shows
    cells = cells[seen]
    rows = {int(r): i for i, r in enumerate(seen)}
    height = min(9.0, 2.0 + 0.09 * len(seen))
    fig, (top, main) = plt.subplots(
        2, 1, figsize=(11, height + 1.6), sharex=True,
        gridspec_kw={"height_ratios": [1.2, height]},
    )  # fmt: skip
    x = np.arange(len(args))
    top.step(x, [a["sequences"] - a["padding"] for a in args], where="mid", label="sequences")
    top.set_ylabel("sequences")
    if any(a["kv_blocks_used"] for a in args):
        kv = top.twinx()
        kv.step(x, [a["kv_blocks_used"] for a in args], where="mid", color="#b0413e")
        kv.set_ylabel("KV blocks used", color="#b0413e")
    main.imshow(cells, aspect="auto", interpolation="nearest", cmap=ListedColormap(COLOURS),
                vmin=0, vmax=len(KINDS) - 1)  # fmt: skip
    marks = [(rows[r], c - first) for r, c in preempted if r in rows and first <= c < stop]
    if marks:
        main.scatter([c for _, c in marks], [r for r, _ in marks], s=14, c="#d62728",
                     marker="o", label="preempted", zorder=3)  # fmt: skip
    main.set_xlabel(f"iteration (forward pass), from {first + 1}")
    main.set_ylabel("requests, in order of arrival")
    used = {KINDS[k] for k in np.unique(cells) if k}
    handles = [
        Patch(color=COLOURS[KINDS.index(k)], label=v) for k, v in LABELS.items() if k in used
    ]
    if marks:
        handles.append(Patch(color="#d62728", label="preempted"))
    main.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=6,
                fontsize=8, frameon=False)  # fmt: skip
    top.set_title(title or "the schedule")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline_chart", description=__doc__)
    parser.add_argument("trace", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--first", type=int, default=0, help="iterations to skip")
    parser.add_argument("--iterations", type=int, default=0, help="iterations to draw (0: all)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    draw(json.loads(args.trace.read_text()), args.out, args.title, args.first, args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
