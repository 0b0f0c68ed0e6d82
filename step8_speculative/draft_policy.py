"""When a draft pays: how many draft tokens each decoding sequence gets this iteration.

A draft token costs a row in the batch, on CPU nearly what a decode row costs; it pays only if
it is likely to be kept. Two measurements decide:

- per sequence, `Acceptance`: alpha, the chance that a draft token is accepted once the ones
  before it were, counted from its own verifications (recent ones weigh more). Its j-th draft
  token is kept with chance alpha**j. A sequence whose alpha is too low to be picked drafts
  again after `probe_after` plain decode steps, as if it would hit (alpha taken as 1), and
  waits twice as long after each such probe that kept nothing: text that starts repeating gets
  its drafts back, free writing pays for a few probes only.
- per machine, `RowCosts`: t(n), the seconds of a forward pass of n rows, timed at engine start
  on the real model (`measure_row_costs`). Not a constant: on one CPU the stored-block kernel
  makes extra rows nearly as dear as the first, on another they are almost free, and past a
  few rows the matmuls change path (step 7's README).

`plan_drafts` joins them: with B sequences decoding, it takes the E draft rows with the best
chances and picks E to make the iteration's expected tokens per second highest,
(B + the E chances) / t(B + E). The first row, of chance p, pays if p * t(B) / B > t(B + 1) - t(B):
the token it may add is worth the time one token of the batch takes, t(B) / B (all B sequences
wait for the iteration), and the row costs its marginal time.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import cast

import torch

from common.request import Request
from step7_real_kv.batch import Batch, build_batch
from step7_real_kv.model_runner import ModelRunner
from step7_real_kv.sequence import Sequence
from step7_real_kv.speed.once import once

DECAY = 0.8  # each verification's counts weigh this much less at the next: alpha follows the text
ROW_COUNTS = (1, 2, 3, 4, 6, 8, 9, 12, 16, 24, 32, 48, 64)  # rows timed at start
PIECE = 8  # the warm-up's rows come in pieces of this many, like decodes and short drafts


@dataclass
class Acceptance:
    """One sequence's drafts so far: the estimate of alpha, and when to probe again."""

    kept: float = 0.0  # draft tokens accepted (decayed)
    looked_at: float = 0.0  # draft tokens the model decided on: the accepted, and each first miss
    plain_steps: int = 0  # decode steps without a draft since the last verification
    wait: int = 0  # plain steps before the next probe

    @property
    def alpha(self) -> float:
        """Accepted over decided, with one of each assumed (so 0.5 before any draft)."""
        return (self.kept + 1) / (self.looked_at + 2)

    @property
    def probing(self) -> bool:
        """A new sequence, or one whose drafts stopped and that has waited long enough."""
        return not self.looked_at or self.plain_steps >= self.wait

    def verified(self, drafted: int, accepted: int, probe_after: int) -> None:
        if self.probing and not accepted:  # a probe that kept nothing: wait longer next time
            self.wait = max(probe_after, 2 * self.wait)
        elif accepted:
            self.wait = probe_after
        self.kept = DECAY * self.kept + accepted
        self.looked_at = DECAY * self.looked_at + accepted + (accepted < drafted)
        self.plain_steps = 0

    def chances(self, k: int) -> list[float]:
        """The chance that each of k draft tokens is kept: alpha**j, or 1 for a probe."""
        alpha = 1.0 if self.probing else self.alpha
        return [alpha**j for j in range(1, k + 1)]


class RowCosts:
    """t(n): seconds of a forward pass of n rows, from a table of measured points (linear in
    between, and beyond the last point along the last two; one point: the same for any n)."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.rows = sorted(seconds)
        # More rows never take less time, and others' work on the CPU only adds time: so t(n)
        # is at most what any n' >= n was timed at (a burst while n was timed is cut off).
        timed = [seconds[n] for n in reversed(self.rows)]
        self.seconds = list(reversed(list(itertools.accumulate(timed, min))))

    def time(self, n: int) -> float:
        rows, secs = self.rows, self.seconds
        if len(rows) == 1:  # one point: every size costs the same
            return secs[0]
        i = min(max(bisect.bisect_left(rows, n), 1), len(rows) - 1)
        slope = (secs[i] - secs[i - 1]) / (rows[i] - rows[i - 1])
        return max(secs[i - 1] + slope * (n - rows[i - 1]), secs[0])

    def describe(self) -> str:
        pairs = zip(self.rows, self.seconds, strict=True)
        return " ".join(f"t({n})={s * 1e3:.1f}ms" for n, s in pairs)


def plan_drafts(chances: list[list[float]], costs: RowCosts) -> list[int]:
    """chances[i][j]: the chance that sequence i's draft token j + 1 is kept. -> how many draft
    tokens each sequence gets: the E best chances, E making (B + their sum) / t(B + E) highest."""
    b = len(chances)
    ranked = sorted(((p, i) for i, row in enumerate(chances) for p in row), reverse=True)
    tokens, best, best_rate = float(b), 0, b / costs.time(b)
    for e, (p, _) in enumerate(ranked, start=1):
        tokens += p
        rate = tokens / costs.time(b + e)
        if rate > best_rate:
            best, best_rate = e, rate
    lengths = [0] * b
    for _, i in ranked[:best]:  # a sequence's chances fall with j: its best are its first
        lengths[i] += 1
    return lengths


def measure_row_costs(
    runner: ModelRunner, block_size: int, num_blocks: int, counts: Iterable[int] = ROW_COUNTS
) -> RowCosts:
    """t(n) for this runner's model here (`time_row_costs`), timed once a process for each
    model, thread count, matmul paths and pool shape (step 7's speed/once.py)."""
    counts = tuple(counts)
    model = (runner.embed.data_ptr(), tuple(runner.embed.shape), runner.linear_paths)
    key = ("row_costs", model, torch.get_num_threads(), block_size, num_blocks, counts)
    return once(key, lambda: time_row_costs(runner, block_size, num_blocks, counts))


@torch.inference_mode()
def time_row_costs(
    runner: ModelRunner, block_size: int, num_blocks: int, counts: Iterable[int]
) -> RowCosts:
    """Time a forward pass of n rows on the real model, for each n the pool has blocks for:
    decode-like rows (pieces of PIECE tokens, each attending to the ones before it), every row
    sampled as a draft's rows are. Each n is timed in 2 rounds over all of them, and the faster
    kept (others' work on the CPU only adds time, and a burst of it hits one round's n, not
    both). Called before any request: the blocks it writes are overwritten before read."""
    per_piece = -(-PIECE // block_size)
    most = num_blocks // per_piece * PIECE
    batches = {n: _batch(runner, n, block_size, per_piece) for n in counts if n <= most}
    for batch in batches.values():
        runner.forward(batch)  # warm: first-call allocations
    rounds = [{n: _timed(runner, b) for n, b in batches.items()} for _ in range(2)]
    seconds = {n: min(timed[n] for timed in rounds) for n in batches}
    return RowCosts(seconds or {1: 1.0})


def _batch(runner: ModelRunner, n: int, block_size: int, per_piece: int) -> Batch:
    work = []
    for p, start in enumerate(range(0, n, PIECE)):
        length = min(PIECE, n - start)
        request = SimpleNamespace(token_ids=[0] * length, num_tokens=length)
        seq = Sequence(cast(Request, request))  # the batch reads only its tokens
        seq.block_table = list(range(p * per_piece, (p + 1) * per_piece))
        work.append((seq, length))
    batch = build_batch(work, block_size, runner.device)
    return dataclasses.replace(batch, sample_rows=torch.arange(n, device=runner.device))


def _timed(runner: ModelRunner, batch: Batch) -> float:
    began = time.perf_counter()
    runner.forward(batch)
    return time.perf_counter() - began
