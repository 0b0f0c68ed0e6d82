"""No request can stall the others: healthy streams keep flowing while abuse arrives.

The same measurement as `python -m bench.stall`, on a real step 7 with the real model, held to
what step 6's README claims: under abuse, the largest gap between two tokens of a healthy
stream stays below 0.25 s, on a quiet 2-core machine where a token takes about 50 ms.

A busier machine makes every token slower, and every gap with it. So the gap is scaled to that
machine first: divided by how much longer than 50 ms a token takes here, in a quiet window of
the same streams just before the abuse (never multiplied: on a fast machine the claim stays
0.25 s). A stall the fixes removed is work that comes back with the abuse: a
traceback formatted and logged on the event loop for each of 400 half-open connections
(0.31-0.37 s gaps, every try), or, without `gc.freeze()`, a full garbage collection over what
start-up made (0.17-0.28 s with the GIL held), which comes with some bursts and not others. So
each kind of abuse runs `ATTEMPTS` times: the median try is held to the claim, which one unlucky
window of noise cannot move, and no try may pass 1.5 times the claim; and the last test holds
the freezing itself, which a window of abuse catches only when a collection falls into it.
"""

from __future__ import annotations

import asyncio
import gc
import statistics

import pytest

from bench.stall import measure
from tests.conftest import tiny_client

pytestmark = pytest.mark.integration

CLAIM_S = 0.25  # step 6's README: the largest gap under abuse
TOKEN_S = 0.05  # a token's time on the quiet machine that claim was measured on
QUIET_WINDOW_S = 2.0  # long enough for a steady median of the token time
ATTEMPTS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_model_dir):
    from tests.conftest import ServerProcess

    proc = ServerProcess("step7_real_kv", tmp_path_factory.mktemp("stall") / "server.log")
    yield proc
    proc.stop()


def scaled_gap(row: dict) -> float:
    """The largest gap under abuse, as it would be on the claim's machine."""
    return row["largest_gap_s"] / max(1.0, row["token_s"] / TOKEN_S)


@pytest.mark.parametrize("abuse", ["big-prompts", "many-messages", "half-open"])
def test_healthy_streams_keep_flowing_under_abuse(server, abuse):
    rows = [
        asyncio.run(measure(server.url, abuse, quiet_s=QUIET_WINDOW_S)) for _ in range(ATTEMPTS)
    ]
    if abuse != "half-open":
        assert all(row["statuses"] == [400] for row in rows), rows  # every one refused, no 5xx
    gaps = sorted(scaled_gap(row) for row in rows)
    assert statistics.median(gaps) < CLAIM_S and gaps[-1] < 1.5 * CLAIM_S, (gaps, rows)


def test_what_start_up_made_is_left_out_of_every_collection(tiny_model_dir):
    """The garbage-collector half of the fix, held where a window of abuse cannot hold it: a
    full collection falls into a window only with some bursts. Once the lifespan has started
    everything, what exists is frozen, and a full collection scans only what came after."""
    gc.unfreeze()  # what an earlier test's lifespan froze
    try:
        with tiny_client("step7_real_kv", tiny_model_dir, response_cache=False):
            frozen = gc.get_freeze_count()
            gc.collect()
            scanned = len(gc.get_objects())  # what a full collection now walks
        assert frozen > 100_000 and scanned < frozen / 10, (frozen, scanned)
    finally:
        gc.unfreeze()
