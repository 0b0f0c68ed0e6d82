"""`python -m bench [run] ...`, `python -m bench check ...`, `python -m bench history ...`,
`python -m bench publish RESULTS_DIR|--refresh|--check`, `python -m bench regression ...`,
`python -m bench multitenant ...` (step 9's routing policies, bench/multitenant.py)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from bench import floors, history, peers
from bench.profiles import PROFILES
from bench.runner import RESULTS_ROOT, RunConfig, run_bench
from bench.servers import discover_steps, select_steps
from bench.workload import DEFAULT_WORKLOAD, resolve_workload

DEFAULT_FLOORS = Path(__file__).resolve().parent / "floors.json"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = ("run", argv)
    commands = ("run", "check", "history", "publish", "peers", "regression", "multitenant")
    if argv and argv[0] in commands:
        command, rest = argv[0], argv[1:]
    handler = {
        "run": _run,
        "check": _check,
        "history": _history,
        "publish": _publish,
        "peers": _peers,
        "regression": _regression,
        "multitenant": _multitenant,
    }[command]
    sys.exit(handler(rest))


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _workload(text: str) -> Path:
    try:
        return resolve_workload(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the steps.")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument(
        "--steps", help="comma-separated numbers or names (default: every step; none: no step)"
    )
    p.add_argument(
        "--peers",
        help="reference servers to run after the steps: vllm,transformers,llamacpp or all "
        "(install first: python -m bench peers install)",
    )
    p.add_argument("--target", help="benchmark this OpenAI-compatible URL instead of the steps")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the timed runs (answers are always checked in float32)",
    )
    p.add_argument("--results", type=Path, help="results folder (default: bench/results/<time>)")
    p.add_argument(
        "--workload",
        type=_workload,
        default=DEFAULT_WORKLOAD,
        help="a workload file, or a name: default, grounded, decode (unique prompts, 128-token "
        "answers), long (1,000-2,000-token prompts), mixed (long prompts among long streams)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        help="reference answers (a results.json or {'answers': ...}) instead of starting step 1",
    )
    p.add_argument("--skip-check", action="store_true", help="time without checking answers")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="s to wait for /health")
    overrides = p.add_argument_group("profile overrides")
    overrides.add_argument("--levels", type=_csv_ints, help="concurrency levels, e.g. 1,4")
    overrides.add_argument("--max-tokens", type=int)
    overrides.add_argument("--run-time", type=float, help="s of new requests per level")
    overrides.add_argument("--stop-timeout", type=float, help="s for in-flight streams to end")
    overrides.add_argument("--max-requests", type=int, help="requests per level")
    return p


def _run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    profile = PROFILES[args.profile].with_overrides(
        levels=args.levels,
        max_tokens=args.max_tokens,
        run_time_s=args.run_time,
        stop_timeout_s=args.stop_timeout,
        max_requests=args.max_requests,
    )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    config = RunConfig(
        profile=profile,
        dtype=args.dtype,
        steps=_steps(args),
        peers=peers.select_peers(args.peers),
        target=args.target,
        results_dir=(args.results or RESULTS_ROOT / stamp).resolve(),
        workload_path=args.workload.resolve(),
        reference_path=args.reference.resolve() if args.reference else None,
        skip_check=args.skip_check,
        ready_timeout_s=args.ready_timeout,
    )
    if not (config.steps or config.target or config.peers):
        raise SystemExit("nothing to run: --steps none needs --peers")
    results = run_bench(config)
    print((config.results_dir / "table.md").read_text())
    return 0 if all(entry["status"] == "ok" for entry in results["steps"]) else 2


def _steps(args: argparse.Namespace) -> tuple[str, ...]:
    """`--steps none` runs only the peers (step 1 still answers the check prompts)."""
    if args.target or (args.steps or "").strip() == "none":
        return ()
    return tuple(select_steps(discover_steps(), args.steps))


def _check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench check")
    p.add_argument("--results", type=Path, default=RESULTS_ROOT / "latest")
    p.add_argument("--floors", type=Path, default=DEFAULT_FLOORS)
    args = p.parse_args(argv)
    return floors.run_check(args.results, args.floors)


def _history(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench history")
    p.add_argument("--append", type=Path, metavar="RESULTS_DIR", help="add this run's summary")
    p.add_argument("--file", type=Path, default=history.HISTORY_FILE)
    p.add_argument("--out", type=Path, default=RESULTS_ROOT / "history.png")
    p.add_argument("--profile", default="quick", help="chart only runs of this profile")
    p.add_argument(
        "--machine-class",
        help="chart only runs of this machine class (default: the newest run's; see "
        "bench/machine.py)",
    )
    args = p.parse_args(argv)
    if args.append:
        line = history.append(args.append, args.file)
        what = f"{line['profile']}, {line['machine_class']}"
        print(f"appended {(line['commit'] or '?')[:10]} ({what}) to {args.file}")
        return 0
    entries = history.read(args.file)
    if not entries:
        print(f"no runs in {args.file}; add one with --append RESULTS_DIR")
        return 1
    print(f"wrote {history.chart(entries, args.out, args.profile, args.machine_class)}")
    return 0


def _peers(argv: list[str]) -> int:
    return peers.main(argv)


def _publish(argv: list[str]) -> int:
    from bench.publish import publish

    p = argparse.ArgumentParser(
        prog="python -m bench publish",
        description="Copy a run's table and charts into bench/charts/<profile>/ and the READMEs, "
        "and rewrite every figure marker (<!-- bench:fig ... -->) from the run it names.",
    )
    p.add_argument("results", type=Path, nargs="?", help="a results folder: bench/results/latest")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="only rewrite the tables, generated sections and figure markers from bench/charts",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="list the figure markers and generated sections that disagree with their run",
    )
    args = p.parse_args(argv)
    if args.check or args.refresh:
        return _figures(check=args.check)
    if args.results is None:
        p.error("give a results folder, --refresh or --check")
    for readme in publish(args.results.resolve()):
        print(f"updated {readme}")
    return 0


def _figures(check: bool) -> int:
    from bench.publish import refresh_figures, refresh_sections, stale_figures, stale_sections

    if check:
        stale = stale_figures() + stale_sections()
        print("\n".join(stale) or "every figure and generated section agrees with its run")
        return 1 if stale else 0
    for page in dict.fromkeys([*refresh_sections(), *refresh_figures()]):
        print(f"updated {page}")
    return 0


def _regression(argv: list[str]) -> int:
    from bench import regression  # matplotlib is slow to import; only this command needs it

    p = argparse.ArgumentParser(
        prog="python -m bench regression",
        description="Charts and a summary of a run against the committed history of like runs.",
    )
    p.add_argument("--results", type=Path, default=RESULTS_ROOT / "latest", help="a results folder")
    p.add_argument("--history", type=Path, default=history.HISTORY_FILE, help="committed history")
    p.add_argument("--floors", type=Path, default=DEFAULT_FLOORS)
    p.add_argument("--out", type=Path, help="charts and summary.md (default: RESULTS/regression)")
    args = p.parse_args(argv)
    out = args.out or args.results / "regression"
    print(regression.write(args.results, args.history, args.floors, out), end="")
    print(f"wrote {out}/summary.md and the charts")
    return 0


def _multitenant(argv: list[str]) -> int:
    from bench import multitenant

    return multitenant.main(argv)
