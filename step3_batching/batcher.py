"""Static batching: group waiting requests into one padded batch and run them together.

The worker takes the first waiting request, then gathers more for at most `max_wait_ms` or until
`max_batch_size` are in hand. The prompts are left-padded to one length (an attention mask hides
the padding, position ids skip it), prefilled in one forward pass, then decoded one token per
row per step, each row with its own sampler, stop sequences and max_tokens.

A row that finishes stops streaming at once, but the batch keeps stepping until its last row is
done, and nothing new can join it: a 10-token answer batched with a 200-token one holds its slot
for 200 steps, and newcomers wait in the queue meanwhile. That waste is what step 7's continuous
batching removes.

A fault in the shared forward pass fails every row; a fault in one row's sampling or
detokenizing fails that row alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from common.config import ConfigPart, knob
from common.model import LoadedModel
from common.request import Request, RequestStatus, log_done
from common.timeline import Iteration, Step, Timeline, TimelineConfig
from step2_queue.queue import QueueEngine, RequestQueue

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class BatchingConfig(ConfigPart):
    max_batch_size: int = knob(16, "rows in one forward pass")
    max_wait_ms: float = knob(100.0, "how long the worker waits to fill a batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_size < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")


class BatchingEngine(QueueEngine):
    """Step 2's engine (queue, start, stop, submit, load); only the worker loop changes."""

    def __init__(
        self,
        lm: LoadedModel,
        queue: RequestQueue,
        config: BatchingConfig,
        timeline: TimelineConfig | None = None,
    ) -> None:
        super().__init__(lm, queue)
        self.max_batch_size = config.max_batch_size
        self.max_wait_s = config.max_wait_ms / 1000
        timeline = timeline or TimelineConfig(timeline=False)
        self.timeline = Timeline(timeline.timeline_iterations) if timeline.timeline else None

    async def submit(self, request: Request) -> None:
        await super().submit(request)
        if self.timeline is not None:
            self.timeline.arrived(request.trace_id, request.arrival_time)

    async def _run(self) -> None:
        while True:
            batch = await self.next_batch()
            await self.run(batch, self.run_batch, batch)

    def run_batch(self, batch: list[Request]) -> None:
        run_batch(self.lm, batch, recorder=self.recorder())

    def recorder(self) -> BatchRecorder:
        return BatchRecorder(self.timeline, self.max_batch_size, lambda: self.queue.depth)

    async def next_batch(self) -> list[Request]:
        batch = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            request = self.queue.get_nowait()
            if request is not None:
                batch.append(request)
            elif time.monotonic() < deadline:
                # Polling, not wait_for(queue.get()): a timed-out get may lose a request.
                await asyncio.sleep(0.001)
            else:
                break
        return batch


class BatchRecorder:
    """One static batch's forward passes, each an iteration of the engine's timeline
    (common/timeline.py): the prefill of every row, then one decode step after another, in
    which a row that has finished is a padding row. Does nothing without a timeline."""

    def __init__(self, timeline: Timeline | None, size: int, waiting: Callable[[], int]):
        self.timeline, self.size, self.waiting = timeline, size, waiting
        self._pending: tuple[float, float, list[Step]] | None = None  # start, forward, steps

    def forward_done(self, start: float, steps: list[Step]) -> None:
        """A forward pass that began at `start` has ended; its sampling comes next."""
        if self.timeline is not None:
            self._pending = (start, time.monotonic() - start, steps)

    def sampled(self, start: float, batch: list[Request]) -> None:
        """The rows' tokens, sampled from `start` on: the iteration is complete."""
        if self.timeline is None or self._pending is None:
            return
        began, forward_s, steps = self._pending
        now = time.monotonic()
        ended = [r for r in batch if r.finished and r.finish_time and r.finish_time >= began]
        phases = {"forward": forward_s, "sample": now - start}
        finished = [(r.trace_id, r.finish_reason or r.status.value) for r in ended]
        self.timeline.record(
            Iteration(
                self.timeline.next_number(), began, phases, steps, finished=finished,
                budget=self.size, waiting=self.waiting(), running=len(steps),
            )
        )  # fmt: skip
        for rid, how in finished:
            self.timeline.ended(rid, how)
        self._pending = None

    @staticmethod
    def decode_steps(batch: list[Request], active: list[bool]) -> list[Step]:
        return [
            Step(r.trace_id, "decode" if live else "padding", 1, r.num_tokens - 1)
            for r, live in zip(batch, active, strict=True)
        ]


def run_batch(lm: LoadedModel, batch: list[Request], compute=None, recorder=None) -> None:
    """Run a batch to its end on the calling thread; a fault fails every row, not the worker."""
    recorder = recorder or BatchRecorder(None, len(batch), lambda: 0)
    try:
        (compute or _decode_batch)(lm, batch, recorder)
    except Exception as exc:
        for request in batch:
            if not request.finished:
                request.fail(exc)
    log_batch(batch)


def log_batch(batch: list[Request]) -> None:
    for request in batch:
        log_done(request, queue_wait_s=round(request.queue_wait_s or 0, 4), batch_size=len(batch))


@torch.inference_mode()
def _decode_batch(lm: LoadedModel, batch: list[Request], recorder: BatchRecorder) -> None:
    input_ids, mask = left_pad([r.prompt_ids for r in batch], lm.tokenizer.pad_token_id, lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not advance positions
    cache = DynamicCache()
    start = time.monotonic()
    logits = forward(lm, input_ids, mask, positions, cache)
    longest = input_ids.shape[1]  # every row runs this many positions, its padding included
    recorder.forward_done(start, [Step(r.trace_id, "prefill", longest, 0) for r in batch])
    decode(lm, batch, cache, mask, positions[:, -1:], logits, recorder)


def forward(lm: LoadedModel, input_ids, mask, positions, cache) -> torch.Tensor:
    """One pass over [B, T] new tokens; returns the last position's logits, [B, vocab]."""
    out = lm.model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def decode(
    lm: LoadedModel, batch: list[Request], cache, mask, last_positions, logits, recorder
) -> None:
    """From the first sampled token until the last row ends: one token per row per step.

    mask: [B, cached_len] attention mask over what `cache` holds; last_positions: [B, 1].
    """
    pad_id = lm.tokenizer.pad_token_id
    active = [True] * len(batch)
    while True:
        start = time.monotonic()
        tokens = [_step_row(r, logits[i], active, i, pad_id) for i, r in enumerate(batch)]
        recorder.sampled(start, batch)
        keep = [i for i, r in enumerate(batch) if r.status != RequestStatus.CANCELLED]
        if len(keep) < len(batch):  # a client left: its row leaves the batch and frees compute
            batch = [batch[i] for i in keep]
            active, tokens = [active[i] for i in keep], [tokens[i] for i in keep]
            cache.batch_select_indices(torch.tensor(keep, device=mask.device))
            mask, last_positions = mask[keep], last_positions[keep]
        if not any(active):
            return
        # Finished rows keep stepping on padding: the cost of a static batch.
        input_ids = torch.tensor(tokens, device=lm.device)[:, None]  # [B, 1]
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
        last_positions = last_positions + 1
        start = time.monotonic()
        logits = forward(lm, input_ids, mask, last_positions, cache)
        recorder.forward_done(start, BatchRecorder.decode_steps(batch, active))


def _step_row(request: Request, logits: torch.Tensor, active: list[bool], i: int, pad_id: int):
    if active[i] and request.cancelled:  # the client left: the row is dropped (below)
        request.drop_cancelled()
        active[i] = False
    if not active[i]:
        return pad_id
    try:
        token = request.sample(logits)
        if request.append_token(token):  # detokenize, stop strings, max_tokens
            active[i] = False
        return token
    except Exception as exc:  # this row's own fault: it fails alone, the batch goes on
        log.exception("request %s failed", request.request_id)
        request.fail(exc)
        active[i] = False
        return pad_id


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts: returns input_ids and attention_mask, both [B, longest]."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        mask[row, longest - len(prompt) :] = 1
    return ids.to(device), mask.to(device)
