"""The cores during a few decode iterations, as a picture: time across, threads and cores down.

    python -m bench.cores_chart RECORD.json OUT.png

RECORD is what `python -m bench.step7_profile --cores` writes. Each level (16, 64 users) gets a
panel: a row per thread that ran (the one that calls the ops, the thread pool's others, the
event loop's) and a row per core, each sample interval drawn as deep as the share of it spent on
CPU (blank: idle); dashed lines are iteration boundaries. Above each panel, the share of the
iterations' wall time with 2, 1 and 0 cores busy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.cores import Interval

THREAD_COLOUR = (0.23, 0.46, 0.69)
CORE_COLOUR = (0.35, 0.65, 0.36)


def rows(level: dict) -> list[tuple[str, str, int]]:
    """(label, "thread" or "core", key) top to bottom: threads by role, then the cores."""
    order = {"calls the ops": 0, "pool": 1, "event loop": 2}
    threads = sorted(level["roles"].items(), key=lambda kv: (order.get(kv[1], 3), int(kv[0])))
    out = [(f"{role} ({tid})", "thread", int(tid)) for tid, role in threads]
    return out + [(f"CPU {cpu}", "core", cpu) for cpu in level["cpus"]]


def summary_line(level: dict) -> str:
    busy = {int(n): share for n, share in level["summary"]["cores_busy"].items()}
    shares = " · ".join(f"{n} busy {100 * busy[n]:.0f}%" for n in sorted(busy, reverse=True))
    ready = level["summary"]["ready_waiting"]["threads"]
    return (
        f"{level['users']} sequences, {level['iteration_ms']:.0f} ms per iteration; cores: "
        f"{shares} of its time; threads ready but off a core: {100 * ready:.0f}%"
    )


def core_load(found: list[Interval]) -> dict[tuple[int, float, float], float]:
    """Each core's share on CPU per sample interval: the sum over its threads, at most 1."""
    load: dict[tuple[int, float, float], float] = {}
    for i in found:
        key = (i.cpu, i.start, i.end)
        load[key] = min(1.0, load.get(key, 0.0) + i.busy)
    return load


def draw_level(ax, level: dict) -> None:  # noqa: ANN001 (a matplotlib Axes)
    found = [Interval(*row) for row in level["drawn"]["intervals"]]
    lanes = rows(level)
    y = {(kind, key): n for n, (_, kind, key) in enumerate(lanes)}
    for i in found:
        if ("thread", i.tid) in y and i.busy > 0:
            ax.broken_barh([(i.start, i.end - i.start)], (y["thread", i.tid] - 0.4, 0.8),
                           facecolor=(*THREAD_COLOUR, i.busy), linewidth=0)  # fmt: skip
    for (cpu, s0, s1), v in core_load(found).items():
        if ("core", cpu) in y and v > 0:
            ax.broken_barh([(s0, s1 - s0)], (y["core", cpu] - 0.4, 0.8),
                           facecolor=(*CORE_COLOUR, v), linewidth=0)  # fmt: skip
    for boundary in level["drawn"]["boundaries"]:
        ax.axvline(boundary, color="#888888", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(lanes)), [label for label, _, _ in lanes], fontsize=8)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_title(summary_line(level), fontsize=9)


def draw(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = record["levels"]
    heights = [len(rows(level)) + 1.2 for level in levels]
    fig, axes = plt.subplots(len(levels), 1, figsize=(11, 0.35 * sum(heights) + 1.4),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    for ax, level in zip(axes[:, 0], levels, strict=True):
        draw_level(ax, level)
    axes[-1, 0].set_xlabel("ms from the first drawn iteration's start")
    machine = record.get("machine", {}).get("machine_class", "?")
    commit = (record.get("git", {}).get("commit") or "?")[:7]
    where = "a step 7 server's" if record.get("source") == "server" else "step 7's decode"
    fig.suptitle(f"Cores during {where} iterations ({machine}, {commit})", fontsize=10)
    fig.text(0.01, 0.005, record.get("command", ""), fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cores_chart", description=__doc__)
    p.add_argument("record", type=Path, help="the JSON that step7_profile --cores wrote")
    p.add_argument("out", type=Path, help="the PNG to write")
    args = p.parse_args(argv)
    draw(json.loads(args.record.read_text()), args.out)


if __name__ == "__main__":
    main()
