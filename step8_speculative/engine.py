"""Step 7's engine with speculative decoding: propose, verify in the same pass, keep what holds.

At one sequence, a decode step reads every weight to make one token, and verifying a few more
tokens in the same pass costs little more (the weights are read once for all the rows). So
before each iteration every decoding sequence gets a draft of up to k tokens from the proposer
(proposer.py, prompt lookup); the draft rides in the flat batch like a short prefill chunk, under
the same token budget (sequence.py, scheduler.py); the forward pass gives logits for the last
real token and every draft token; verification (verify.py) keeps the draft's longest prefix the
model agrees with and one token of the model's own. What changes here, against step 7:

- `_propose`, before the scheduler runs: drafts, only while speculation can pay (at most
  `spec_max_batch` running sequences: with many, the batch's rows are real work already) and
  only into KV blocks that are free (a draft never makes the scheduler preempt anyone);
- `_compute`: a drafted sequence is sampled at every one of its rows, and verified;
- `_postprocess`: the kept tokens are appended one by one (stop strings, EOS and max_tokens
  end a request inside a kept run exactly where they would without speculation), and only the
  tokens kept count as computed: the KV slots of rejected ones are simply written over by the
  next iteration, and since a block is named only once its tokens are computed, a block holding
  a rejected token is never offered to the prefix cache.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import cast

import torch
from prometheus_client.core import CounterMetricFamily, Metric

from common.config import knob
from common.model import LoadedModel
from common.request import Request
from common.timeline import Step
from step7_real_kv.batch import build_batch
from step7_real_kv.engine import EngineConfig, Forked, PagedEngine, Sampled, sample_or_error
from step7_real_kv.scheduler import Work
from step7_real_kv.sequence import Sequence
from step8_speculative.proposer import PromptLookup, ProposerConfig
from step8_speculative.scheduler import SpecScheduler
from step8_speculative.sequence import DraftSequence
from step8_speculative.verify import Kept, verify

Verified = list[Kept] | Exception  # a drafted sequence's kept tokens, or why it failed


@dataclass(frozen=True)
class SpeculativeConfig(ProposerConfig, EngineConfig):
    spec_max_batch: int = knob(
        4, "speculate only while at most this many sequences run (measured: README)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec_max_batch < 0:
            raise ValueError("spec_max_batch must be >= 0")


@dataclass
class SpecStats:
    verifications: int = 0  # drafted sequences verified
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # ... and accepted
    by_position: list[int] = dataclasses.field(default_factory=list)  # accepted at 1, 2, ...


class SpeculativeEngine(PagedEngine):
    def __init__(self, lm: LoadedModel, config: SpeculativeConfig) -> None:
        super().__init__(lm, config)
        self.scheduler = SpecScheduler(self.blocks, config)  # its sequences carry drafts
        self.proposer = PromptLookup(config)
        self.spec_max_batch = config.spec_max_batch
        self.stats = SpecStats(by_position=[0] * config.num_speculative_tokens)
        self._verified: dict[str, tuple[int, int]] = {}  # this iteration: (proposed, accepted)

    async def step(self) -> None:
        self._propose()
        await super().step()

    # ------------------------------------------------------------ on the event loop

    def _propose(self) -> None:
        """A draft for each decoding sequence, while speculation pays and blocks are free."""
        running = self.scheduler.running
        if self.proposer.k == 0 or len(running) > self.spec_max_batch:
            return
        if self.blocks.num_free < 2 * len(running) + 1:  # the pool is tight: no extra slots
            return
        size = self.blocks.block_size
        for seq in cast(list[DraftSequence], running):
            request = seq.request
            if seq.num_pending != 1 or request.cancelled:  # prefilling, or leaving
                continue
            room = request.max_tokens - request.num_output_tokens - 1
            draft = self.proposer.propose(request.token_ids, min(self.proposer.k, room))
            # Slots in the blocks the sequence has, and in at most one more.
            have = len(seq.block_table) * size - seq.num_computed - 1
            seq.draft = draft[: max(0, have + size)]

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
        """As step 7's, with a drafted sequence's kept tokens appended before its computed
        count moves on, by the tokens kept only."""
        drafted = {seq for seq, _ in work if cast(DraftSequence, seq).draft}
        for seq, n in work:
            if seq not in drafted:
                self.scheduler.advance(seq, n)
        for leader, child, token in forked:  # before the leader may end and free its blocks
            child_seq, copy = self.scheduler.fork(leader, child)
            if copy is not None:
                self.kv.copy_block(*copy)
            sampled.append((child_seq, token))
        for seq, result in sampled:
            if seq in drafted:
                self._take_verified(cast(DraftSequence, seq), result)
            elif seq.request.cancelled or self._take_token(seq, result):
                self._retire(seq)

    def _take_verified(self, seq: DraftSequence, result: Verified) -> None:
        proposed = len(seq.draft)
        seq.draft = []
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
        self._verified[seq.request.trace_id] = (proposed, accepted)

    def _log_fields(self, seq: Sequence) -> dict[str, object]:
        draft = cast(DraftSequence, seq)
        return {**super()._log_fields(seq), "drafted": draft.drafted, "accepted": draft.accepted}

    # ------------------------------------------------------------ on the worker thread

    @torch.inference_mode()
    def _compute(self, work: Work, forks: dict[Sequence, list[Request]]):
        """Step 7's forward pass, with every row of a drafted sequence sampled and verified."""
        start = time.monotonic()
        batch = build_batch(work, self.blocks.block_size, self.runner.device)
        groups = _row_groups(batch.sampled, batch.sample_rows)
        if groups:  # (an iteration of prefill chunks only samples nothing)
            batch = dataclasses.replace(batch, sample_rows=torch.cat([r for _, r in groups]))
        logits = self.runner.forward(batch)  # [all sampled rows, vocab]
        forward_done = time.monotonic()
        sampled: list[tuple[Sequence, Sampled | Verified]] = []
        forked: list[Forked] = []
        row = 0
        for seq, rows in groups:
            mine = logits[row : row + len(rows)]
            row += len(rows)
            draft = cast(DraftSequence, seq).draft
            if draft:
                sampled.append((seq, _verify(seq.request, mine, draft)))
            else:
                sampled.append((seq, sample_or_error(seq.request, mine[0])))
                forked += [
                    (seq, child, sample_or_error(child, mine[0])) for child in forks.get(seq, [])
                ]
        return sampled, forked, (forward_done - start, time.monotonic() - forward_done)


def _row_groups(sampled: list[Sequence], last_rows: torch.Tensor):
    """Each sampled sequence's rows to sample: its last row, and before it one per draft token
    (a drafted sequence's rows are consecutive: the batch puts a short chunk's rows together)."""
    groups = []
    for seq, last in zip(sampled, last_rows.tolist(), strict=True):
        k = len(cast(DraftSequence, seq).draft)
        groups.append((seq, torch.arange(last - k, last + 1, device=last_rows.device)))
    return groups


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
        ]
