"""Step 7's engine with speculative decoding: propose, verify in the same pass, keep what holds.

At one sequence, a decode step reads every weight to make one token, and verifying a few more
tokens in the same pass costs little more (the weights are read once for all the rows). So
before each iteration a decoding sequence may get a draft of up to k tokens from the proposer
(proposer.py, prompt lookup); the draft rides in the flat batch like a short prefill chunk, under
the same token budget (sequence.py, scheduler.py); the forward pass gives logits for the last
real token and every draft token; verification (verify.py) keeps the draft's longest prefix the
model agrees with and one token of the model's own. What changes here, against step 7:

- `_propose`, before the scheduler runs: drafts only where they pay (draft_policy.py: each
  sequence's measured acceptance against what a row costs at this batch size on this machine,
  timed at start) and only into KV blocks that are free (a draft never makes the scheduler
  preempt anyone); the scheduler writes each draft into its sequence;
- `_batch` and `_sample`, two steps of step 7's `_compute`: a drafted sequence is sampled at
  every one of its rows, and verified; the others are sampled as in step 7;
- `_postprocess`: step 7's for the sequences without a draft; a drafted one's kept tokens are
  appended one by one (stop strings, EOS and max_tokens end a request inside a kept run exactly
  where they would without speculation), and only the tokens kept count as computed: the KV
  slots of rejected ones are simply written over by the next iteration, and since a block is
  named only once its tokens are computed, a block holding a rejected token is never offered to
  the prefix cache.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import cast

import torch
from prometheus_client.core import CounterMetricFamily, Metric

from common.config import knob
from common.model import LoadedModel
from common.request import Request
from common.timeline import Step
from step7_real_kv.batch import Batch
from step7_real_kv.engine import EngineConfig, Forked, PagedEngine
from step7_real_kv.scheduler import Work
from step7_real_kv.sequence import Sequence
from step8_speculative.draft_policy import RowCosts, measure_row_costs, plan_drafts
from step8_speculative.proposer import PromptLookup, ProposerConfig
from step8_speculative.scheduler import SpecScheduler
from step8_speculative.sequence import DraftSequence
from step8_speculative.verify import Kept, verify

log = logging.getLogger("gateway")

Verified = list[Kept] | Exception  # a drafted sequence's kept tokens, or why it failed
SKIP_REASONS = ("acceptance", "cost", "no_match", "pool")


@dataclass(frozen=True)
class SpeculativeConfig(ProposerConfig, EngineConfig):
    spec_probe_after: int = knob(
        16,
        "a sequence whose drafts stopped paying drafts again after this many plain decode "
        "steps, and twice as long after each such probe that kept nothing",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec_probe_after < 1:
            raise ValueError("spec_probe_after must be >= 1")


@dataclass
class SpecStats:
    verifications: int = 0  # drafted sequences verified
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # ... and accepted
    by_position: list[int] = dataclasses.field(default_factory=list)  # accepted at 1, 2, ...
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)  # no draft, by reason


class SpeculativeEngine(PagedEngine):
    scheduler: SpecScheduler

    def __init__(self, lm: LoadedModel, config: SpeculativeConfig) -> None:
        super().__init__(lm, config)
        self.scheduler = SpecScheduler(self.blocks, config)  # its sequences carry drafts
        self.proposer = PromptLookup(config)
        self.probe_after = config.spec_probe_after
        self.stats = SpecStats(by_position=[0] * config.num_speculative_tokens)
        self.row_costs = self._measure_row_costs(config)
        self._verified: dict[str, tuple[int, int]] = {}  # this iteration: (proposed, accepted)

    def _measure_row_costs(self, config: SpeculativeConfig) -> RowCosts:
        """What a draft row costs on this machine, timed once at start (draft_policy.py)."""
        if self.proposer.k == 0:
            return RowCosts({1: 1.0})
        costs = measure_row_costs(self.runner, config.block_size, config.num_kv_blocks)
        log.info("forward pass by rows, for the drafts' cost: %s", costs.describe())
        return costs

    async def step(self) -> None:
        self._propose()
        await super().step()

    # ------------------------------------------------------------ on the event loop

    def _propose(self) -> None:
        """A draft for each decoding sequence where it pays (draft_policy.py: its measured
        acceptance against what a row costs at this batch size), into free KV blocks only."""
        running = cast(list[DraftSequence], self.scheduler.running)
        decoding = [s for s in running if s.num_pending == 1 and not s.request.cancelled]
        if self.proposer.k == 0 or not decoding:
            return
        if self.blocks.num_free < 2 * len(running) + 1:  # each one's next block and a draft's
            return self._skip(decoding, "pool")
        lengths = plan_drafts([self._chances(s) for s in decoding], self.row_costs)
        for seq, k in zip(decoding, lengths, strict=True):
            if k == 0:
                self._skip([seq], "cost" if seq.acceptance.probing else "acceptance")
                continue
            self.scheduler.draft(seq, self.proposer.propose(seq.request.token_ids, k))
            if not seq.draft:
                self._skip([seq], "no_match")

    def _chances(self, seq: DraftSequence) -> list[float]:
        """The chance each draft token would be kept, for as many as the answer has room for."""
        request = seq.request
        room = request.max_tokens - request.num_output_tokens - 1
        return seq.acceptance.chances(min(self.proposer.k, room))

    def _skip(self, seqs: list[DraftSequence], reason: str) -> None:
        """Decoding sequences that get no draft this iteration, and why."""
        self.stats.skipped[reason] += len(seqs)
        for seq in seqs:
            seq.acceptance.plain_steps += 1

    def _steps(self, work: Work) -> list[Step]:
        steps = super()._steps(work)
        for i, (seq, _) in enumerate(work):
            draft = cast(DraftSequence, seq).draft
            if draft:
                steps[i] = dataclasses.replace(steps[i], kind="verify", proposed=len(draft))
        return steps

    def _record(self, clock, times, steps: list[Step], forked: list[Forked]) -> None:
        verified, self._verified = self._verified, {}
        steps = [
            dataclasses.replace(s, accepted=verified[s.request_id][1])
            if s.kind == "verify" and s.request_id in verified
            else s
            for s in steps
        ]
        super()._record(clock, times, steps, forked)

    def _postprocess(self, work: Work, sampled: list, forked: list[Forked]) -> None:
        """Step 7's for the sequences without a draft; a drafted one's kept tokens are
        appended, and then its computed count moves on, by the tokens kept only."""
        verified = {seq: result for seq, result in sampled if cast(DraftSequence, seq).draft}
        super()._postprocess(
            [(seq, n) for seq, n in work if seq not in verified],
            [(seq, result) for seq, result in sampled if seq not in verified],
            forked,
        )
        for seq, result in verified.items():
            self._take_verified(cast(DraftSequence, seq), result)

    def _take_verified(self, seq: DraftSequence, result: Verified) -> None:
        proposed = len(self.scheduler.end_draft(seq))
        if seq.request.cancelled:
            return self._retire(seq)
        if isinstance(result, Exception):
            self._take_token(seq, result)  # fails this sequence alone
            return self._retire(seq)
        accepted = len(result) - 1  # the last kept token is always the model's own
        self._count(seq, proposed, accepted)
        for token, logprobs in result:
            seq.request.sampler.last_logprobs = logprobs
            if self._take_token(seq, token):
                return self._retire(seq)
        self.scheduler.advance(seq, 1 + accepted)  # the last real token and the kept drafts

    def _count(self, seq: DraftSequence, proposed: int, accepted: int) -> None:
        stats = self.stats
        stats.verifications += 1
        stats.drafted += proposed
        stats.accepted += accepted
        for position in range(accepted):
            stats.by_position[position] += 1
        seq.drafted += proposed
        seq.accepted += accepted
        seq.acceptance.verified(proposed, accepted, self.probe_after)
        self._verified[seq.request.trace_id] = (proposed, accepted)

    def _log_fields(self, seq: Sequence) -> dict[str, object]:
        draft = cast(DraftSequence, seq)
        return {**super()._log_fields(seq), "drafted": draft.drafted, "accepted": draft.accepted}

    # ------------------------------------------------------------ on the worker thread

    def _batch(self, work: Work) -> Batch:
        """Step 7's batch, with every row of a drafted sequence sampled: one per draft token,
        then its last (a drafted sequence's rows are consecutive: the batch puts a short
        chunk's rows together)."""
        batch = super()._batch(work)
        rows = [
            torch.arange(last - len(cast(DraftSequence, seq).draft), last + 1)
            for seq, last in zip(batch.sampled, batch.sample_rows.tolist(), strict=True)
        ]
        if not rows:  # (an iteration of prefill chunks only samples nothing)
            return batch
        return dataclasses.replace(batch, sample_rows=torch.cat(rows).to(batch.sample_rows))

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor, forks: dict[Sequence, list[Request]]
    ) -> tuple[list, list[Forked]]:
        """logits: a row per draft token and one more for each sequence. A drafted sequence's
        rows are verified; the others are sampled as step 7 samples them."""
        verified: list[tuple[Sequence, Verified]] = []
        plain, plain_rows, row = [], [], 0
        for seq in seqs:
            draft = cast(DraftSequence, seq).draft
            if draft:
                rows = logits[row : row + len(draft) + 1]
                verified.append((seq, _verify(seq.request, rows, draft)))
            else:
                plain.append(seq)
                plain_rows.append(row)
            row += len(draft) + 1
        sampled, forked = super()._sample(plain, logits[plain_rows], forks)
        return [*verified, *sampled], forked


def _verify(request: Request, rows: torch.Tensor, draft: list[int]) -> Verified:
    try:
        return verify(request, rows, draft)
    except Exception as exc:  # reported on the loop, for this sequence only
        return exc


class SpecCollector:
    """gateway_spec_* counters, read at scrape time: drafted and accepted tokens, verifications,
    and acceptance by draft position. Tokens per verification = accepted / verifications + 1
    (the model's own token, which every verification yields)."""

    def __init__(self, engine: SpeculativeEngine) -> None:
        self.engine = engine

    def collect(self) -> list[Metric]:
        stats = self.engine.stats
        by_position = CounterMetricFamily(
            "gateway_spec_accepted_by_position",
            "Draft tokens accepted at each position of their draft (1 = first).",
            labels=["position"],
        )
        for position, count in enumerate(stats.by_position, start=1):
            by_position.add_metric([str(position)], count)
        return [
            CounterMetricFamily(
                "gateway_spec_verifications", "Drafted sequences verified.", stats.verifications
            ),
            CounterMetricFamily(
                "gateway_spec_drafted_tokens", "Draft tokens proposed.", stats.drafted
            ),
            CounterMetricFamily(
                "gateway_spec_accepted_tokens", "Draft tokens accepted.", stats.accepted
            ),
            by_position,
            self._skipped(stats.skipped),
        ]

    @staticmethod
    def _skipped(skipped: Counter[str]) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "gateway_spec_skipped",
            "Decode steps of a sequence without a draft, by reason: acceptance (its drafts are "
            "kept too rarely), cost (rows too dear at this batch size even for a sure draft), "
            "no_match (the lookup found nothing), pool (too few free KV blocks).",
            labels=["reason"],
        )
        for reason in SKIP_REASONS:
            family.add_metric([reason], skipped[reason])
        return family
