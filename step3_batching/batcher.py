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
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from common.config import ConfigPart, knob
from common.model import LoadedModel
from common.request import Request, RequestStatus, log_done
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

    def __init__(self, lm: LoadedModel, queue: RequestQueue, config: BatchingConfig) -> None:
        super().__init__(lm, queue)
        self.max_batch_size = config.max_batch_size
        self.max_wait_s = config.max_wait_ms / 1000

    async def _run(self) -> None:
        while True:
            batch = await self.next_batch()
            await self.run(batch, self.run_batch, batch)

    def run_batch(self, batch: list[Request]) -> None:
        run_batch(self.lm, batch)

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


def run_batch(lm: LoadedModel, batch: list[Request], compute=None) -> None:
    """Run a batch to its end on the calling thread; a fault fails every row, not the worker."""
    try:
        (compute or _decode_batch)(lm, batch)
    except Exception as exc:
        for request in batch:
            if not request.finished:
                request.fail(exc)
    log_batch(batch)


def log_batch(batch: list[Request]) -> None:
    for request in batch:
        log_done(request, queue_wait_s=round(request.queue_wait_s or 0, 4), batch_size=len(batch))


@torch.inference_mode()
def _decode_batch(lm: LoadedModel, batch: list[Request]) -> None:
    input_ids, mask = left_pad([r.prompt_ids for r in batch], lm.tokenizer.pad_token_id, lm.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not advance positions
    cache = DynamicCache()
    logits = forward(lm, input_ids, mask, positions, cache)
    decode(lm, batch, cache, mask, positions[:, -1:], logits)


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


def decode(lm: LoadedModel, batch: list[Request], cache, mask, last_positions, logits) -> None:
    """From the first sampled token until the last row ends: one token per row per step.

    mask: [B, cached_len] attention mask over what `cache` holds; last_positions: [B, 1].
    """
    pad_id = lm.tokenizer.pad_token_id
    active = [True] * len(batch)
    while True:
        tokens = [_step_row(r, logits[i], active, i, pad_id) for i, r in enumerate(batch)]
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
        logits = forward(lm, input_ids, mask, last_positions, cache)


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
