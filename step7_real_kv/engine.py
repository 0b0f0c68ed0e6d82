"""The engine: a loop of iterations, each one schedule -> forward -> sample -> hand tokens over.

A request waits in one place, the scheduler's waiting queue: `submit` puts it there (step 6's
admission, in front, decides whether it may), and before every iteration the scheduler picks the
work, so a newcomer joins the very next forward pass instead of waiting for a batch to end.
Every sampled token goes through `request.append_token`, the one place where stop strings, EOS
and max_tokens end a request; an ended or cancelled sequence frees its blocks at once.

Threads: the event loop owns the scheduler, the block manager and every request. `submit`,
admission's questions, deadlines and the bookkeeping after each iteration (`_postprocess`) all
run there, one at a time, so none of them needs a lock. Only the batch's forward pass and
sampling run on a worker thread (the torch thread, `speed/torch_thread.py`, the one thread that
runs torch's parallel work, as it loaded the model and built this engine), and the C++ kernels
let go of the GIL,
so the loop keeps serving HTTP meanwhile; it may add waiting sequences or read counts, but
changes nothing the batch uses (a client that leaves only raises its request's flag; the
sequence is retired at the start of the next iteration, after the thread has let go of it).

Faults: the forward pass is shared, so a fault there fails every sequence of the iteration.
Sampling and detokenizing are per sequence: a fault there fails that sequence alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from common.api import EngineLoad
from common.config import knob
from common.errors import APIError
from common.model import LoadedModel
from common.request import Request, log_done
from common.timeline import Iteration, PhaseClock, Step, Timeline, TimelineConfig
from step7_real_kv.batch import Batch, build_batch
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.model_runner import ModelRunner
from step7_real_kv.paged_kv import PagedKVCache
from step7_real_kv.scheduler import Scheduler, SchedulerConfig, Work
from step7_real_kv.sequence import Sequence
from step7_real_kv.speed import cpu_kernels, stored_weights, torch_thread
from step7_real_kv.speed.stored_weights import StoredWeight, find_gguf

log = logging.getLogger("gateway")

Sampled = int | Exception  # a sequence's new token, or why it could not get one
Sampled_ = tuple[Sequence, Sampled]
Forked = tuple[Sequence, Request, Sampled]  # (leader, a choice starting from it, its token)
LINEAR_BACKENDS = ("auto", "torch")
KERNELS = ("auto", "cpp", "torch")
WEIGHT_FORMATS = ("auto", "blocks", "float32")


@dataclass(frozen=True)
class EngineConfig(TimelineConfig, SchedulerConfig):
    block_size: int = knob(16, "token slots per KV block")
    num_kv_blocks: int = knob(2048, "blocks in the KV pool (32768 tokens, 1.4 GiB in float32)")
    linear_backend: str = knob("auto", "auto: oneDNN, weights prepacked, on a CPU | torch")
    kernels: str = knob(
        "auto",
        "the C++ CPU kernels (paged attention, norm, rope, SiLU, small matmuls), float32 on a "
        "CPU: auto (when they load, else the torch code, logged) | cpp (required: start-up "
        "fails without them) | torch",
    )
    weight_format: str = knob(
        "auto",
        "matmuls of a few rows read the weights as the GGUF stores them (Q4_1/Q8_0 blocks, "
        "5.6x fewer bytes) or as float32: auto (blocks where they are the model's weights bit "
        "for bit, and the kernels run) | blocks (required; served lossy if they differ) | "
        "float32",
    )
    block_rows: int = knob(
        0,
        "matmuls of up to this many rows read the stored blocks, more go to oneDNN; 0: "
        "measured at start-up, where the blocks stop beating oneDNN on this machine",
    )

    torch_thread: bool = knob(
        True,
        "load the model, build the engine and run every forward pass on one thread: one "
        "OpenMP team, its workers kept awake (speed/torch_thread.py); false: forward passes on "
        "asyncio.to_thread's threads, the model loaded on the event loop's",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend is one of {LINEAR_BACKENDS}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels is one of {KERNELS}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format is one of {WEIGHT_FORMATS}")
        if self.block_rows < 0:
            raise ValueError("block_rows must be >= 0 (0: measured at start-up)")
        if min(self.block_size, self.num_kv_blocks) < 1:
            raise ValueError("block_size and num_kv_blocks must be at least 1")


class PagedEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig) -> None:
        self.kv = PagedKVCache.for_model(lm, config.num_kv_blocks, config.block_size)
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config)
        kernels = cpu_kernels_for(lm, config)
        self.runner = ModelRunner(
            lm, self.kv, config.linear_backend, kernels, config.max_num_seqs,
            stored_weights_for(lm, config, kernels), lossy=config.weight_format == "blocks",
            block_rows=config.block_rows,
        )  # fmt: skip
        if self.runner.lossy:
            log.warning(
                "%d stored weights differ from the model's float32 weights: %s",
                len(self.runner.lossy),
                "served lossy, as weight_format=blocks asks" if config.weight_format == "blocks"
                else "using float32 for them all",
            )  # fmt: skip
        self._off_loop = torch_thread.run if config.torch_thread else asyncio.to_thread
        self.batch_size_hooks: list[Callable[[int], object]] = []  # sequences per iteration
        self.timeline = Timeline(config.timeline_iterations) if config.timeline else None
        self._retired: list[tuple[str, str]] = []  # (request, how) since the last record
        self._work_arrived = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        log.info(
            "paged KV pool: %d blocks x %d tokens, %.0f MiB; backends: %s",
            config.num_kv_blocks, config.block_size,
            config.num_kv_blocks * self.kv.bytes_per_block / 2**20,
            " ".join(f"{k}={v}" for k, v in self.runner.backends.items()),
        )  # fmt: skip

    # ------------------------------------------------------------ on the event loop

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def submit(self, request: Request) -> None:
        """Queue a validated request (the server asked `require_fit` first)."""
        self.scheduler.add(request)
        if self.timeline is not None:
            self.timeline.arrived(request.trace_id, request.arrival_time)
        self._work_arrived.set()

    # What others ask; the scheduler, which owns the queues, answers.
    def load(self) -> EngineLoad:
        return self.scheduler.load()

    def require_fit(self, request: Request) -> None:
        self.scheduler.require_fit(request)

    def kv_demand(self, request: Request) -> tuple[int, int]:
        return self.scheduler.kv_demand(request)

    def expire(self, request: Request, error: APIError) -> bool:
        return self.scheduler.expire(request, error)

    async def _run(self) -> None:
        while True:
            if not self.scheduler.has_work:
                self._work_arrived.clear()
                await self._work_arrived.wait()
            await self.step()

    async def step(self) -> None:
        """One iteration: schedule -> forward and sample (worker thread) -> postprocess."""
        clock = PhaseClock()
        self._retire_cancelled()
        work = self.scheduler.schedule()
        if not work:  # nothing can run before a running sequence ends (or none is left)
            await asyncio.sleep(0.001)
            return
        for hook in self.batch_size_hooks:
            hook(len(work))
        forks = self.scheduler.forks_due(work)  # n > 1: choices sampled from their leader's row
        steps = self._steps(work) if self.timeline is not None else []
        clock.lap("schedule")
        try:
            sampled, forked, times = await self._off_loop(self._compute, work, forks)
        except Exception as exc:  # the shared forward pass: every sequence in it fails
            log.exception("iteration failed")
            return self._fail_all(work, exc)
        clock.lap("compute")
        self._postprocess(work, sampled, forked)
        clock.lap("hand-over")
        self._record(clock, times, steps, forked)

    def _steps(self, work: Work) -> list[Step]:
        """For the timeline: what each scheduled sequence does in this iteration."""
        admitted = self.scheduler.admitted
        return [
            Step(
                seq.request.trace_id,
                "decode"
                if n == 1 and seq.num_computed == seq.num_tokens - 1 and seq not in admitted
                else "prefill",
                n,
                seq.num_computed,
                cached=admitted.get(seq, 0),
            )
            for seq, n in work
        ]

    def _record(self, clock: PhaseClock, times, steps: list[Step], forked: list[Forked]) -> None:
        """The iteration onto the timeline: its phases (the worker's forward and sampling in
        place of the thread hop around them), its steps, who was preempted or ended."""
        retired, self._retired = self._retired, []
        if self.timeline is None:
            return
        forward_s, sample_s = times
        phases = {"schedule": clock.phases["schedule"], "forward": forward_s,
                  "sample": sample_s, "hand-over": clock.phases["hand-over"]}  # fmt: skip
        steps += [
            Step(child.trace_id, "fork", 0, leader.num_tokens - 1) for leader, child, _ in forked
        ]
        load = self.load()
        self.timeline.record(
            Iteration(
                self.timeline.next_number(), clock.start, phases, steps,
                preempted=[s.request.trace_id for s in self.scheduler.preempted],
                finished=retired, budget=self.scheduler.budget,
                kv_used=self.blocks.num_blocks - self.blocks.num_free,
                kv_total=self.blocks.num_blocks, waiting=load.waiting, running=load.running,
                cpu_s=clock.cpu(),
            )
        )  # fmt: skip
        for rid, how in retired:
            self.timeline.ended(rid, how)

    def _postprocess(self, work: Work, sampled: list[Sampled_], forked: list[Forked]) -> None:
        """The one place an iteration's results land: computed counts and block names, the
        choices that start from their leader's prompt, then each new token handed to its
        request, then the sequences that ended retired."""
        for seq, n in work:
            self.scheduler.advance(seq, n)
        for leader, child, token in forked:  # before the leader may end and free its blocks
            child_seq, copy = self.scheduler.fork(leader, child)
            if copy is not None:
                self.kv.copy_block(*copy)
            sampled.append((child_seq, token))
        for seq, token in sampled:
            if seq.request.cancelled or self._take_token(seq, token):
                self._retire(seq)

    def _take_token(self, seq: Sequence, token: Sampled) -> bool:
        """Append the token (detokenize, stop strings, max_tokens); True once it has ended."""
        request = seq.request
        try:
            if isinstance(token, Exception):
                raise token
            return request.append_token(token)
        except Exception as exc:  # this sequence's fault: the others go on
            log.exception("request %s failed", request.request_id)
            request.fail(exc)
            return True

    def _retire_cancelled(self) -> None:
        for seq in self.scheduler.cancelled():
            self._retire(seq)
        for child in self.scheduler.drop_cancelled_forks():
            child.drop_cancelled()
            log_done(child, dropped="queued")

    def _fail_all(self, work: Work, error: BaseException) -> None:
        for seq, _ in work:
            if not seq.request.finished:  # rows that ended before the fault keep their answer
                seq.request.fail(error)
                self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        request = seq.request
        if request.cancelled and not request.finished:
            request.drop_cancelled()
        self._retired.append((request.trace_id, request.finish_reason or request.status.value))
        log_done(request, **self._log_fields(seq))

    def _log_fields(self, seq: Sequence) -> dict[str, object]:
        """What the request's log line says about its time in this engine."""
        return {
            "queue_wait_s": round(seq.request.queue_wait_s or 0, 4),
            "cached_tokens": seq.request.cached_prompt_tokens,
            "preemptions": seq.num_preemptions,
        }

    # ------------------------------------------------------------ on the worker thread

    @torch.inference_mode()
    def _compute(
        self, work: Work, forks: dict[Sequence, list[Request]]
    ) -> tuple[list[Sampled_], list[Forked], tuple[float, float]]:
        """The batch's forward pass, then the tokens sampled from its logits; and the time
        each took, in seconds."""
        start = time.monotonic()
        batch = self._batch(work)
        logits = self.runner.forward(batch)  # [rows to sample, vocab]
        forward_done = time.monotonic()
        sampled, forked = self._sample(batch.sampled, logits, forks)
        return sampled, forked, (forward_done - start, time.monotonic() - forward_done)

    def _batch(self, work: Work) -> Batch:
        """The iteration's flat batch: one row per new token, the last row of each sequence
        whose prompt is all in sampled."""
        return build_batch(work, self.blocks.block_size, self.runner.device)

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor, forks: dict[Sequence, list[Request]]
    ) -> tuple[list[Sampled_], list[Forked]]:
        """logits: [len(seqs), vocab]. A token for each sequence, and for each choice that
        forks from it (from the same row, with its own sampler). The rows of plain greedy
        requests take their argmax from one call over every row (a call a row cost about 0.1 ms
        each, 6 ms an iteration at 64 sequences); the others sample their row themselves."""
        sampled: list[Sampled_] = []
        forked: list[Forked] = []
        requests = [[seq.request, *forks.get(seq, [])] for seq in seqs]
        best = None
        if any(r.sampler.plain_greedy for choices in requests for r in choices):
            best = logits.argmax(dim=-1).tolist()
        for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            leader, *children = requests[i]
            argmax = best[i] if best is not None else None
            sampled.append((seq, sample_or_error(leader, row, argmax)))
            forked += [(seq, child, sample_or_error(child, row, argmax)) for child in children]
        return sampled, forked


def sample_or_error(request: Request, logits: torch.Tensor, argmax: int | None = None) -> Sampled:
    """The request's next token from its row (`argmax`: the row's, when already taken), or the
    error its sampler raised."""
    try:
        if argmax is not None and request.sampler.plain_greedy:
            request.sampler.took(logits, argmax)  # its logprobs, if asked for
            return argmax
        return request.sample(logits)
    except Exception as exc:  # reported on the loop, for this sequence only
        return exc


def cpu_kernels_for(lm: LoadedModel, config: EngineConfig) -> ModuleType | None:
    """cpu_kernels.cpp for a float32 model on a CPU, unless the torch code is asked for. With
    `kernels=cpp` they must load (or start-up fails, saying why); with `auto` the server runs
    the torch code where they cannot, and says so."""
    if config.kernels == "torch":
        return None
    usable = lm.device.type == "cpu" and lm.dtype == torch.float32
    if config.kernels == "cpp":
        if not usable:
            raise RuntimeError(
                f"kernels=cpp: the C++ kernels run float32 on a CPU, not {lm.dtype} on "
                f"{lm.device.type}; use kernels=auto or torch"
            )
        return cpu_kernels.load(required=True)
    return cpu_kernels.load() if usable else None


def stored_weights_for(
    lm: LoadedModel, config: EngineConfig, kernels: ModuleType | None
) -> dict[str, StoredWeight] | None:
    """The GGUF's blocks for the runner (stored_weights.py), where they can be used: the
    kernels run and the model was converted from a GGUF found in the cache."""
    if config.weight_format == "float32":
        return None
    path = find_gguf(lm.path) if lm.path is not None else None
    if kernels is None or path is None:
        if config.weight_format == "blocks":
            raise RuntimeError(
                "weight_format=blocks needs the C++ kernels and the GGUF the model was "
                f"converted from (kernels: {kernels is not None}, GGUF: {path})"
            )
        return None
    started = time.monotonic()
    c = lm.config
    stored = stored_weights.load(
        path, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    )
    log.info(
        "stored weights: %d matrices, %.0f MB of blocks from %s in %.1f s",
        len(stored), sum(w.nbytes for w in stored.values()) / 1e6, path.name,
        time.monotonic() - started,
    )  # fmt: skip
    return stored


class KVCollector:
    """gateway_kv_blocks_{used,total}, gateway_preemptions_total and gateway_engine_info (the
    backends this engine runs), read at scrape time."""

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
        yield InfoMetricFamily(
            "gateway_engine", "The backends the engine runs.", value=self.engine.runner.backends
        )
