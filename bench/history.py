"""bench/history.jsonl: one line per recorded run, so a chart can follow each step across commits.

python -m bench history --append bench/results/latest   add a run (then commit the file)
python -m bench history                                  chart it to bench/results/history.png

Every line names its machine class (bench/machine.py); a chart draws the lines of one class.

Its quick-profile lines are also CI's history: `python -m bench regression` (regression.py)
compares each CI run with the lines measured like it and takes its noise band from their spread.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import floors
from bench.machine import UNKNOWN

HISTORY_FILE = Path(__file__).resolve().parent / "history.jsonl"
KEPT = ("req_per_s", "output_tok_s", "ttft_p50_s", "tpot_p50_s", "e2e_p50_s", "e2e_p99_s")


def summary_line(results: dict) -> dict:
    meta, config = results["meta"], results["config"]
    return {
        "commit": meta.get("commit"),
        "dirty": meta.get("dirty"),
        "finished_at": meta.get("finished_at"),
        "profile": config["profile"]["name"],
        "dtype": config["dtype"],
        "workload": floors.run_workload(results),
        "workload_sha256": meta["workload"]["sha256"],
        "machine_class": run_class(results),
        "cpu_model": meta["machine"]["cpu_model"],
        "cores": meta["machine"]["cores"],
        "steps": {entry["step"]: _step_summary(entry) for entry in results["steps"]},
    }


def run_class(results: dict) -> str:
    """The run's machine class (bench/machine.py); `unknown` for runs recorded before it was."""
    return results["meta"]["machine"].get("machine_class") or UNKNOWN


def _step_summary(entry: dict) -> dict:
    levels = {
        str(lv["concurrency"]): {
            **{k: lv["summary"].get(k) for k in KEPT},
            "foreign_cpu": lv.get("foreign_cpu"),  # a busy machine explains an outlier
        }
        for lv in entry["levels"]
        if not lv["partial"]
    }
    return {"status": entry["status"], "levels": levels}


def append(results_dir: Path, history: Path = HISTORY_FILE) -> dict:
    line = summary_line(json.loads((results_dir / "results.json").read_text()))
    with history.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def read(history: Path = HISTORY_FILE) -> list[dict]:
    if not history.exists():
        return []
    return [json.loads(line) for line in history.read_text().splitlines() if line.strip()]


def latest_class(entries: list[dict], profile: str) -> str:
    """The machine class of the newest line of this profile: what `chart` draws by default."""
    runs = [e for e in entries if e["profile"] == profile]
    return runs[-1].get("machine_class", UNKNOWN) if runs else UNKNOWN


def chart(
    entries: list[dict], out: Path, profile: str = "quick", machine_class: str | None = None
) -> Path:
    """Throughput and median latency at each step's highest concurrency, run after run, of one
    machine class only (default: the newest run's): numbers from two classes do not compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machine_class = machine_class or latest_class(entries, profile)
    if machine_class == UNKNOWN:  # such lines may come from any machine: no chart joins them
        raise SystemExit(
            f"the newest {profile} run is of unknown machine class (recorded before the class "
            "was); append a new run, or pass a machine class"
        )
    runs = [
        e
        for e in entries
        if e["profile"] == profile and e.get("machine_class", UNKNOWN) == machine_class
    ]
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for step in sorted({s for e in runs for s in e["steps"]}, key=_step_key):
        xs, series = _series(runs, step)
        for ax, key in zip(axes, ("output_tok_s", "e2e_p50_s"), strict=True):
            ax.plot(xs, [point[key] for point in series], marker="o", label=step)
    labels = [(e["commit"] or "?")[:7] + ("*" if e["dirty"] else "") for e in runs]
    axes[1].set_xticks(range(len(runs)), labels, rotation=45, fontsize=8)
    axes[0].set_ylabel("output tokens/s")
    axes[1].set_ylabel("e2e p50 (s)")
    axes[0].set_title(
        f"{profile} profile, machine class {machine_class}, each step at its highest "
        "concurrency (* = dirty tree)"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _series(runs: list[dict], step: str) -> tuple[list[int], list[dict]]:
    xs, points = [], []
    for i, run in enumerate(runs):
        levels = run["steps"].get(step, {}).get("levels", {})
        if levels:
            xs.append(i)
            points.append(levels[max(levels, key=int)])
    return xs, [{k: (v if v is not None else float("nan")) for k, v in p.items()} for p in points]


def _step_key(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name.split("_")[0] if ch.isdigit())
    return (int(digits) if digits else 1_000, name)
