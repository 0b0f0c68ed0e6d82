"""From per-attempt records to one summary per (step, concurrency): rates and percentiles.

A logical request may take several attempts (429/503 with Retry-After); its outcome is its last
attempt's. Attempts cut off by the end of a level are counted apart and nowhere else. Throughput
counts completed requests over the window from the first send to the last byte.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from bench.records import Record


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), interpolating linearly between ranks (numpy's default)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(records: Sequence[Record]) -> dict:
    """Throughput, latency percentiles, error and rejection rates for one level."""
    finished = [r for r in records if not r.cut_off]
    ok = [r for r in finished if r.ok]
    return {
        **_counts(finished),
        "cut_off": len(records) - len(finished),
        **_throughput(finished, ok),
        **_latencies(ok),
    }


def _counts(records: Sequence[Record]) -> dict:
    first = [r for r in records if r.attempt == 0]
    final = _final_attempts(records)
    errors = sum(1 for r in final if not r.ok and not r.rejected)
    rejected_first = sum(1 for r in first if r.rejected)
    return {
        "requests": len(final),
        "completed": sum(1 for r in final if r.ok),
        "retries": len(records) - len(first),
        "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in records).items())},
        "errors": errors,
        "error_rate": _rate(errors, len(final)),
        "rejections": sum(1 for r in records if r.rejected),
        "rejection_rate": _rate(rejected_first, len(first)),
    }


def _final_attempts(records: Sequence[Record]) -> list[Record]:
    last: dict[int, Record] = {}
    for r in records:
        if r.request_id not in last or r.attempt > last[r.request_id].attempt:
            last[r.request_id] = r
    return list(last.values())


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _throughput(records: Sequence[Record], ok: Sequence[Record]) -> dict:
    window = _window(records)
    tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "window_s": window,
        "output_tokens": tokens,
        "req_per_s": len(ok) / window if window else None,
        "output_tok_s": tokens / window if window else None,
        # Prompt tokens of completed requests over the same window: the prefill rate under load.
        "prompt_tokens": prompt_tokens,
        "prompt_tok_s": prompt_tokens / window if window and prompt_tokens else None,
        # Answers that ended on their own before max_tokens: a decode-bound workload wants none.
        "stopped_early": sum(1 for r in ok if r.finish_reason == "stop"),
    }


def _window(records: Sequence[Record]) -> float | None:
    ends = [r.start + r.e2e_s for r in records if r.e2e_s is not None]
    if not ends:
        return None
    return max(ends) - min(r.start for r in records)


def _latencies(ok: Sequence[Record]) -> dict:
    series = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [t for r in ok if (t := r.tpot_s) is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
    }
    found = {
        f"{name}_p{q}_s": percentile(values, q)
        for name, values in series.items()
        for q in (50, 90, 99)
    }
    found["itl_max_s"] = max(series["itl"], default=None)  # the longest any stream froze
    found["prompt_tokens_p50"] = percentile([r.prompt_tokens for r in ok if r.prompt_tokens], 50)
    return found


def summarise_classes(records: Sequence[Record]) -> dict[str, dict]:
    """One summary per request class of a workload that has classes; {} for one that has none."""
    names = sorted({r.request_class for r in records if r.request_class})
    return {name: summarise([r for r in records if r.request_class == name]) for name in names}
