"""Step 7's live page (step7_real_kv/live.py), showing step 8's speculation too.

The snapshot adds what the proposer and verification did: the counters /metrics reports as
gateway_spec_* (drafts proposed, tokens accepted, verifications) and each running sequence's
draft length. The strip already shows the drafts: a verify row is a sequence checking its draft.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from step7_real_kv import live


def spec_snapshot(engine: Any) -> dict[str, Any]:
    """Step 7's snapshot, and speculation's counters and drafts."""
    snap = live.engine_snapshot(engine)
    stats = engine.stats
    snap["spec"] = {
        "spec_verifications": stats.verifications,
        "spec_drafted_tokens": stats.drafted,
        "spec_accepted_tokens": stats.accepted,
    }
    # The rows are the scheduler's `running`, in its order (engine_snapshot's islice).
    for row, seq in zip(snap["running"], engine.scheduler.running, strict=False):
        row["draft"] = len(seq.draft)
    return snap


def routes() -> list[Route]:
    return live.routes(spec_snapshot)
