"""PNG charts of one run: throughput, latency and TTFT by step, and latency against throughput."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402

from bench.peers import is_peer_row  # noqa: E402

CHART_FILES = ("throughput.png", "latency.png", "ttft.png", "curves.png")


def write_charts(results: dict, results_dir: Path) -> list[Path]:
    timed = [entry for entry in results["steps"] if entry["levels"]]
    title = _title(results)
    paths = [
        _bars(timed, title, results_dir / "throughput.png", [("output_tok_s", "output tokens/s")]),
        _bars(
            timed,
            title,
            results_dir / "latency.png",
            [("e2e_p50_s", "end-to-end p50 (s)"), ("e2e_p99_s", "end-to-end p99 (s)")],
        ),
        _bars(
            timed,
            title,
            results_dir / "ttft.png",
            [("ttft_p50_s", "time to first token p50 (s)"), ("ttft_p99_s", "TTFT p99 (s)")],
        ),
        _curves(timed, title, results_dir / "curves.png"),
    ]
    return paths


def _title(results: dict) -> str:
    config, meta = results["config"], results["meta"]
    commit = (meta.get("commit") or "unknown")[:7]
    machine_class = meta.get("machine", {}).get("machine_class", "unknown machine class")
    profile = config["profile"]["name"]
    return f"{profile} profile, {config['dtype']}, commit {commit}, {machine_class}"


def _bars(timed: list[dict], title: str, path: Path, metrics: list[tuple[str, str]]) -> Path:
    """One panel per metric; in each, a group of bars per step, one bar per concurrency."""
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], metrics, strict=True):
        _grouped(ax, timed, partial(_summary_value, key=key))
        ax.set_ylabel(label)
    axes[0, 0].set_title(title)
    return _save(fig, path)


def _summary_value(level: dict, key: str) -> float | None:
    return level["summary"][key]


def _grouped(ax, timed: list[dict], value: Callable[[dict], float | None]) -> None:
    levels = sorted({level["concurrency"] for entry in timed for level in entry["levels"]})
    width = 0.8 / max(len(levels), 1)
    for i, concurrency in enumerate(levels):
        heights = [_at(entry, concurrency, value) for entry in timed]
        xs = [x + (i - (len(levels) - 1) / 2) * width for x in range(len(timed))]
        ax.bar(xs, [h or 0.0 for h in heights], width, label=f"concurrency {concurrency}")
    ax.set_xticks(range(len(timed)), [entry["step"] for entry in timed], fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _at(entry: dict, concurrency: int, value: Callable[[dict], float | None]) -> float | None:
    for level in entry["levels"]:
        if level["concurrency"] == concurrency:
            return value(level)
    return None


def _curves(timed: list[dict], title: str, path: Path) -> Path:
    """Each step's trade-off: where its points lie as concurrency grows (labels)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for entry in timed:
        points = [
            (lv["summary"]["output_tok_s"], lv["summary"]["e2e_p50_s"], lv["users"])
            for lv in entry["levels"]
            if lv["summary"]["output_tok_s"] is not None and lv["summary"]["e2e_p50_s"]
        ]
        if not points:
            continue
        xs, ys, _ = zip(*points, strict=True)
        style = "--" if is_peer_row(entry["step"]) else "-"  # peers: the yardstick, dashed
        ax.plot(xs, ys, marker="o", linestyle=style, label=entry["step"])
        for x, y, u in points:
            ax.annotate(f"{u}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("output tokens/s (all users)")
    ax.set_ylabel("end-to-end latency p50 (s)")
    ax.set_title(f"latency vs throughput, labels = concurrent users\n{title}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
