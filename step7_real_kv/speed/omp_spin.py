"""How long OpenMP's idle workers spin before they sleep, set before torch loads libgomp.

With one team (torch_thread.py) the workers spin between parallel regions instead of sleeping,
by default for up to 300,000 rounds (GOMP_SPINCOUNT): milliseconds, so they spin through the
Python between two layers' ops too, holding a core that the event loop and the request threads
then lack. Under a burst of oversized requests that showed as healthy streams stalling past a
quarter second (`tests/test_stall.py` failed with the default); 10,000 rounds, a fraction of a
millisecond, still spans the short gaps between the ops of a layer, and the stall test passes.
In the server on the decode workload at 1, 16 and 64 users, 10,000 measured 61.3, 237.5 and
303.3 tokens/s against 56.8, 245.1 and 300.4 with the default (step 7's README).

libgomp reads the variable once, as it loads with torch, so each serving step's package (7, 8,
10) calls `before_torch` first thing. It sets the variable only while torch loads: the
processes a server starts (a router's replicas) set their own, and a GOMP_SPINCOUNT already in
the environment wins.
"""

from __future__ import annotations

import importlib
import os
import sys

SPIN_COUNT = "10000"


def before_torch() -> None:
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ:
        return  # libgomp has read its environment already, or the caller chose
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    try:
        importlib.import_module("torch")  # libgomp loads with torch and reads it now
    finally:
        del os.environ["GOMP_SPINCOUNT"]
