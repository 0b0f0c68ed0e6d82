"""The engine: a loop of iterations, each one schedule -> forward -> sample -> hand tokens over.

Requests wait in step 2's bounded queue (429 when it is full). Between iterations the engine
moves them into the scheduler, so a newcomer joins the very next forward pass instead of waiting
for a batch to end. Each iteration runs on a worker thread; the event loop stays free for HTTP.
Every sampled token goes through `request.append_token`, the one place where stop strings, EOS
and max_tokens end a request; an ended or cancelled sequence frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from common.errors import APIError
from common.model import LoadedModel
from common.request import Request, RequestStatus, log_done
from step2_queue.queue import QueueEngine, RequestQueue
from step7_real_kv.batch import build_batch
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.model_runner import ModelRunner
from step7_real_kv.paged_kv import PagedKVCache
from step7_real_kv.scheduler import Scheduler, Work
from step7_real_kv.sequence import Sequence

log = logging.getLogger("gateway")


class PagedEngine(QueueEngine):
    """Step 2's engine (queue, start, stop, submit) with step 7's loop: one iteration at a time."""

    def __init__(
        self,
        lm: LoadedModel,
        queue: RequestQueue,
        block_size: int = 16,
        num_kv_blocks: int = 2048,
        max_num_batched_tokens: int = 256,
        max_num_seqs: int = 64,
    ) -> None:
        config = lm.model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        super().__init__(lm, queue)
        self.kv = PagedKVCache(
            config.num_hidden_layers, num_kv_blocks, block_size,
            config.num_key_value_heads, head_dim, lm.dtype, lm.device,
        )  # fmt: skip
        self.blocks = BlockManager(num_kv_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens, max_num_seqs)
        self.runner = ModelRunner(lm, self.kv)
        log.info(
            "paged KV pool: %d blocks x %d tokens, %.0f MiB",
            num_kv_blocks, block_size, num_kv_blocks * self.kv.bytes_per_block / 2**20,
        )  # fmt: skip

    # ------------------------------------------------------------ on the event loop

    async def submit(self, request: Request) -> None:
        if not self.scheduler.fits(request):
            slots = self.blocks.num_blocks * self.blocks.block_size
            raise APIError(
                f"prompt plus max_tokens exceeds the KV pool ({slots} tokens)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        await super().submit(request)

    async def _run(self) -> None:
        while True:
            if not self.scheduler.has_work:
                self.scheduler.add(await self.queue.get())
            self._take_from_queue()
            await asyncio.to_thread(self.step)

    def _take_from_queue(self) -> None:
        """Newcomers join between iterations; the queue keeps its bound (and its 429s)."""
        while len(self.scheduler.waiting) < self.scheduler.max_num_seqs:
            request = self.queue.get_nowait()
            if request is None:
                return
            self.scheduler.add(request)

    # ------------------------------------------------------------ on the worker thread

    def step(self) -> None:
        """One iteration: every scheduled sequence advances by its share of the budget."""
        self._drop_cancelled()
        work = self.scheduler.schedule()
        if not work:
            return
        try:
            batch = build_batch(work, self.blocks.block_size, self.lm.device)
            logits = self.runner.forward(batch)  # [sampled sequences, vocab]
            self._advance(work)
            for seq, row in zip(batch.sampled, logits, strict=True):
                self._take_token(seq, row)
        except Exception as exc:  # the worker must outlive a bad iteration (forward or sampling)
            log.exception("iteration failed")
            self._fail(work, exc)

    def _advance(self, work: Work) -> None:
        for seq, n in work:
            if seq.request.status is RequestStatus.WAITING:
                seq.request.status = RequestStatus.RUNNING
            seq.num_computed += n
            self.scheduler.name_full_blocks(seq)

    def _take_token(self, seq: Sequence, logits: torch.Tensor) -> None:
        if seq.request.cancelled:
            return self._retire(seq)
        token = seq.request.sampler.sample(logits)
        seq.token_ids.append(token)
        if seq.request.append_token(token):
            self._retire(seq)

    def _drop_cancelled(self) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.request.cancelled:
                self._retire(seq)

    def _fail(self, work: Work, error: BaseException) -> None:
        for seq, _ in work:
            if not seq.request.finished:  # rows that ended before the fault keep their answer
                seq.request.fail(error)
                self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        log_done(
            seq.request,
            queue_wait_s=round(seq.request.queue_wait_s or 0, 4),
            cached_tokens=seq.num_cached_tokens,
            preemptions=seq.num_preemptions,
        )
