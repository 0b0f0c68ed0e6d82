"""Bench profiles: how hard and how long to push each step. Every level is bounded twice,
in time (run_time_s + stop_timeout_s) and in requests (max_requests)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Profile:
    name: str
    levels: tuple[int, ...]  # concurrent users
    max_tokens: int
    run_time_s: float  # new requests start only within this window
    stop_timeout_s: float  # then in-flight streams get this long to finish
    max_requests: int  # logical requests per level
    warmup_requests: int = 2

    def __post_init__(self) -> None:
        if not self.levels or min(self.levels) < 1:
            raise ValueError("levels must be positive concurrency values")
        if self.max_tokens < 1 or self.run_time_s <= 0 or self.max_requests < 1:
            raise ValueError("max_tokens, run_time_s and max_requests must be positive")

    @property
    def level_timeout_s(self) -> float:
        """Past this the harness kills the load generator: a level never hangs the run."""
        return self.run_time_s + self.stop_timeout_s + 30.0

    def with_overrides(self, **changes) -> Profile:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PROFILES = {
    # At most ~65 s of load per step (two levels of 15+15 s) plus start, check and warm-up.
    "quick": Profile(
        "quick", (1, 8), max_tokens=32, run_time_s=15, stop_timeout_s=15, max_requests=200
    ),
    "full": Profile(
        "full", (1, 4, 16, 64), max_tokens=128, run_time_s=60, stop_timeout_s=60, max_requests=2000
    ),
}

# Step 0 loads a fresh ~540 MB copy of the weights (fp32) for every request in flight, so its
# memory grows with concurrency; past this many users it would only measure swapping or the OOM
# killer. Levels above a cap run at the cap, and the table says so.
CONCURRENCY_CAPS = {"step0_bruteforce": 4}


def plan_levels(levels: tuple[int, ...], cap: int | None) -> list[tuple[int, int]]:
    """(requested level, users actually run) pairs; levels that collapse onto the cap run once."""
    planned: list[tuple[int, int]] = []
    for level in levels:
        users = min(level, cap) if cap else level
        if users not in (u for _, u in planned):
            planned.append((level, users))
    return planned
