"""Start-up measurements, taken once a process.

The engine measures a few things about the machine when it starts (where the stored blocks stop
beating oneDNN, linear.py; what a draft row costs, step 8's draft_policy.py). A process that
builds several engines on one model (the tests, step 10's local pair of engines) asks the same
question again with the same inputs; `once` answers it from the first measurement. The key names
the measurement and everything its answer depends on (thread count, shapes, paths).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_results: dict[tuple, Any] = {}


def once(key: tuple, measure: Callable[[], T]) -> T:
    """`measure()` the first time `key` is asked for in this process; its answer after that."""
    if key not in _results:
        _results[key] = measure()
    return _results[key]


def forget() -> None:
    """Drop every answer (tests that time with a fake clock)."""
    _results.clear()
