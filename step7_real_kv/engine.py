"""The engine: a loop of iterations, each one schedule -> forward -> sample -> hand tokens over.

A request waits in one place, the scheduler's waiting queue: `submit` puts it there (step 6's
admission, in front, decides whether it may), and before every iteration the scheduler picks the
work, so a newcomer joins the very next forward pass instead of waiting for a batch to end.
Every sampled token goes through `request.append_token`, the one place where stop strings, EOS
and max_tokens end a request; an ended or cancelled sequence frees its blocks at once.

Threads: the event loop owns the scheduler, the block manager and every request. `submit`,
cancellation, admission, deadlines and the bookkeeping between iterations all run there, one at a
time, so none of them needs a lock. Only the batch's forward pass and sampling run on a worker
thread (`asyncio.to_thread`); while it runs, the loop serves HTTP and may add waiting sequences or
read the free block count, but changes nothing the batch uses (a cancelled sequence is retired
at the start of the next iteration, after the thread has let go of its blocks).

Faults: the forward pass is shared, so a fault there fails every sequence of the iteration.
Sampling and detokenizing are per sequence: a fault there fails that sequence alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.config import ConfigPart, knob
from common.model import LoadedModel
from common.request import Request, log_done
from step7_real_kv import cpu_kernels
from step7_real_kv.batch import build_batch
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.model_runner import ModelRunner
from step7_real_kv.paged_kv import PagedKVCache
from step7_real_kv.scheduler import Scheduler, Work
from step7_real_kv.sequence import Sequence

log = logging.getLogger("gateway")

Sampled = int | Exception  # a sequence's new token, or why it could not get one
BACKENDS = ("auto", "torch")


@dataclass(frozen=True)
class EngineConfig(ConfigPart):
    block_size: int = knob(16, "token slots per KV block")
    num_kv_blocks: int = knob(2048, "blocks in the KV pool (32768 tokens, 1.4 GiB in float32)")
    max_num_batched_tokens: int = knob(256, "new tokens per iteration: decodes + prefill chunks")
    max_num_seqs: int = knob(64, "sequences running at once")
    linear_backend: str = knob("auto", "auto: oneDNN, weights prepacked, on a CPU | torch")
    kernels: str = knob(
        "auto", "auto: the C++ CPU kernels (paged attention, norm, SiLU) on a CPU | torch"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.linear_backend not in BACKENDS or self.kernels not in BACKENDS:
            raise ValueError(f"linear_backend and kernels are one of {BACKENDS}")
        if min(self.block_size, self.num_kv_blocks, self.max_num_seqs) < 1:
            raise ValueError("block_size, num_kv_blocks and max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


class PagedEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig) -> None:
        self.kv = PagedKVCache.for_model(lm, config.num_kv_blocks, config.block_size)
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config)
        self.runner = ModelRunner(
            lm, self.kv, config.linear_backend, cpu_kernels_for(lm, config), config.max_num_seqs
        )
        self.batch_size_hooks: list[Callable[[int], object]] = []  # sequences per iteration
        self._work_arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        log.info(
            "paged KV pool: %d blocks x %d tokens, %.0f MiB",
            config.num_kv_blocks, config.block_size,
            config.num_kv_blocks * self.kv.bytes_per_block / 2**20,
        )  # fmt: skip

    # ------------------------------------------------------------ on the event loop

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def submit(self, request: Request) -> None:
        self.scheduler.add(request)  # 400 if the whole pool could not hold it
        self._work_arrived.set()

    async def _run(self) -> None:
        while True:
            if not self.scheduler.has_work:
                self._work_arrived.clear()
                await self._work_arrived.wait()
            await self.step()

    async def step(self) -> None:
        """One iteration: every scheduled sequence advances by its share of the budget."""
        self._retire_cancelled()
        work = self.scheduler.schedule()
        if not work:  # nothing can run before a running sequence ends (or none is left)
            await asyncio.sleep(0.001)
            return
        for hook in self.batch_size_hooks:
            hook(len(work))
        try:
            sampled = await asyncio.to_thread(self._compute, work)
        except Exception as exc:  # the shared forward pass: every sequence in it fails
            log.exception("iteration failed")
            return self._fail_all(work, exc)
        for seq, n in work:
            seq.num_computed += n
            self.scheduler.name_full_blocks(seq)
        for seq, token in sampled:
            self._take_token(seq, token)

    def _take_token(self, seq: Sequence, token: Sampled) -> None:
        request = seq.request
        if request.cancelled:
            return self._retire(seq)
        try:
            if isinstance(token, Exception):
                raise token
            finished = request.append_token(token)  # detokenize, stop strings, max_tokens
        except Exception as exc:  # this sequence's fault: the others go on
            log.exception("request %s failed", request.request_id)
            request.fail(exc)
            finished = True
        if finished:
            self._retire(seq)

    def _retire_cancelled(self) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.request.cancelled:
                self._retire(seq)

    def _fail_all(self, work: Work, error: BaseException) -> None:
        for seq, _ in work:
            if not seq.request.finished:  # rows that ended before the fault keep their answer
                seq.request.fail(error)
                self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        log_done(
            seq.request,
            queue_wait_s=round(seq.request.queue_wait_s or 0, 4),
            cached_tokens=seq.request.cached_prompt_tokens,
            preemptions=seq.num_preemptions,
        )

    # ------------------------------------------------------------ on the worker thread

    @torch.inference_mode()
    def _compute(self, work: Work) -> list[tuple[Sequence, Sampled]]:
        """The batch's forward pass, then a token for each sequence whose prompt is all in."""
        batch = build_batch(work, self.blocks.block_size, self.runner.device)
        logits = self.runner.forward(batch)  # [sampled sequences, vocab]
        return [(seq, _sample(seq, row)) for seq, row in zip(batch.sampled, logits, strict=True)]


def _sample(seq: Sequence, logits: torch.Tensor) -> Sampled:
    try:
        return seq.request.sample(logits)
    except Exception as exc:  # reported on the loop, for this sequence only
        return exc


def cpu_kernels_for(lm: LoadedModel, config: EngineConfig) -> ModuleType | None:
    """cpu_kernels.cpp for a float32 model on a CPU, unless the torch code is asked for or the
    kernels cannot be built here."""
    if config.kernels == "auto" and lm.device.type == "cpu" and lm.dtype == torch.float32:
        return cpu_kernels.load()
    return None


class KVCollector:
    """gateway_kv_blocks_{used,total} and gateway_preemptions_total, read at scrape time."""

    def __init__(self, engine: PagedEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        blocks = self.engine.blocks
        yield GaugeMetricFamily(
            "gateway_kv_blocks_total", "Blocks in the KV pool.", value=blocks.num_blocks
        )
        yield GaugeMetricFamily(
            "gateway_kv_blocks_used",
            "Blocks held by sequences.",
            value=blocks.num_blocks - blocks.num_free,
        )
        yield CounterMetricFamily(
            "gateway_preemptions",
            "Sequences preempted for blocks.",
            value=self.engine.scheduler.num_preemptions,
        )
