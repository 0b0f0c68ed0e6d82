"""Step 8's engine, able to hand a prompt's KV blocks to another engine and to take them in.

One engine can play either part, and which one a request gets is said by its
`kv_transfer_params` (the fields of vLLM's disaggregation proxy):

- **prefill** (`do_remote_decode`): the request runs as usual (the proxy asks for one token);
  as it ends, the blocks of its prompt are put under a lease (leases.py) instead of being
  freed, and the params the decode engine needs to fetch them are recorded for the answer
  (`KVTransfer.answer`);
- **decode** (`do_remote_prefill`): before the request is queued, the engine asks its own prefix
  cache for the prompt's blocks, fetches only the ones it lacks through the connector
  (kv_connector.py), writes them into fresh blocks of its pool and names the full ones, then
  tells the prefill engine it is done. The scheduler then admits the request as a prefix-cache
  hit whose last, partial block was taken in too (scheduler.py): it computes only the prompt's
  last token, for the logits, and samples every output token itself, so greedy and seeded
  answers are step 7's.

When the blocks cannot be had (the prefill engine gone, the lease expired, a bad reply), the
policy `kv_transfer_failure` decides: `recompute` (the default) prefills the prompt here,
`fail` fails the request with a clear error.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.config import ConfigPart, knob
from common.errors import APIError
from common.model import LoadedModel
from common.request import Request
from step7_real_kv.sequence import Sequence
from step7_real_kv.speed import torch_thread
from step8_speculative.engine import SpeculativeConfig, SpeculativeEngine
from step10_disaggregated.kv_connector import (
    KVBlocks,
    KVConnector,
    LocalConnector,
    TransferError,
    TransferParams,
)
from step10_disaggregated.leases import Leases, by_block, handed_over
from step10_disaggregated.scheduler import DisaggScheduler

log = logging.getLogger("gateway")

FAILURE_POLICIES = ("recompute", "fail")
TRANSPORTS = ("http", "shm")  # http_connector.py


@dataclass
class KVTransfer:
    """An API request's kv_transfer_params, and for a prefill, the params to answer with once
    its blocks are held (what the decode engine needs to fetch them)."""

    params: TransferParams
    answer: TransferParams | None = None


# The transfer of the API request being submitted: the server sets it around the request (the
# request schema of common/ has no such field), the engine reads it in `submit`.
KV_TRANSFER: contextvars.ContextVar[KVTransfer | None] = contextvars.ContextVar(
    "kv_transfer", default=None
)


@dataclass(frozen=True)
class TransferConfig(ConfigPart):
    kv_lease_s: float = knob(30.0, "seconds handed-over blocks wait for the decode engine")
    kv_transfer_failure: str = knob(
        "recompute",
        "when the prompt's blocks cannot be had (transfer failed, prefill engine gone): "
        "recompute (the prompt, on the decode engine) | fail (the request, 502)",
    )
    kv_transport: str = knob(
        "http",
        "how a decode engine fetches the blocks from a prefill engine: http (in the answer, "
        "over the socket: any machine) | shm (a file of /dev/shm: engines on one machine)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_lease_s <= 0:
            raise ValueError("kv_lease_s must be > 0")
        if self.kv_transfer_failure not in FAILURE_POLICIES:
            raise ValueError(f"kv_transfer_failure is one of {FAILURE_POLICIES}")
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"kv_transport is one of {TRANSPORTS}")


@dataclass(frozen=True)
class DisaggConfig(TransferConfig, SpeculativeConfig):
    engine_id: str = knob("", "this engine's name in kv_transfer_params (default: a fresh one)")


class DisaggEngine(SpeculativeEngine):
    scheduler: DisaggScheduler

    def __init__(
        self, lm: LoadedModel, config: DisaggConfig, connector: KVConnector | None = None
    ) -> None:
        super().__init__(lm, config)
        self.scheduler = DisaggScheduler(self.blocks, config)
        self.engine_id = config.engine_id or f"engine-{uuid.uuid4().hex[:8]}"
        self.leases = Leases(self.blocks, self.kv, config.kv_lease_s)
        self.connector: KVConnector = connector or LocalConnector(self)
        self.failure_policy = config.kv_transfer_failure
        # Prefill side: the requests to hand over as they end, each with its transfer.
        self._hand_over: weakref.WeakKeyDictionary[Request, KVTransfer] = (
            weakref.WeakKeyDictionary()
        )
        self._expiry_task: asyncio.Task | None = None

    def start(self) -> None:
        super().start()
        self._expiry_task = asyncio.create_task(self._expire_leases(), name="kv-leases")

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        self.leases.release_all("stopped")
        await super().stop()

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.leases.lease_s / 4))
            self.leases.expire()

    # ------------------------------------------------------------ submitting

    async def submit(self, request: Request) -> None:
        transfer = KV_TRANSFER.get()
        params = transfer.params if transfer is not None else {}
        if transfer is not None and params.get("do_remote_decode") and request.index == 0:
            self._hand_over[request] = transfer
        taking_over = params.get("do_remote_prefill") and request is request.siblings[0]
        if taking_over and not await self.take_in(request, params):
            return  # failed, policy `fail`
        await super().submit(request)

    async def take_in(self, request: Request, params: TransferParams) -> bool:
        """Take in the prompt's blocks this engine lacks, pinned until the request runs; False
        when the request failed instead (policy `fail`)."""
        names, tail = handed_over(request.prompt_ids, self.blocks.block_size)
        held = self.blocks.lookup(names[: len(names) - bool(tail)])  # a partial one: never
        self.blocks.share(held)  # ours from now on: nothing evicts them while we fetch
        how, keep = "confirmed", True
        try:
            if len(held) < len(names):
                held += await self._fetch(params, names, len(held), tail)
        except TransferError as exc:
            how = "cancelled"
            log.warning("request %s: KV blocks not taken in: %s", request.request_id, exc)
            if self.failure_policy == "fail":
                keep = False
                self.blocks.free(held)
                request.fail(APIError(f"the prompt's KV blocks could not be had: {exc}", 502))
                return False
        except BaseException:  # cancelled (the caller is gone): nothing stays held for it
            how, keep = "cancelled", False
            self.blocks.free(held)
            raise
        finally:
            try:
                await self._release(params, "cancelled" if request.cancelled else how)
            except BaseException:  # cancelled while telling the prefill engine: not pinned yet
                if keep:
                    self.blocks.free(held)
                raise
        taken_tail = (held.pop(), tail) if tail and len(held) == len(names) else None
        self.scheduler.pin_until_running(request, held, taken_tail)
        return True

    async def _fetch(
        self, params: TransferParams, names: list[bytes], skip: int, tail: int
    ) -> list[int]:
        """Fetch the blocks after the first `skip`, check they are this prompt's, and write
        them into fresh blocks, the full ones named like computed ones; their ids."""
        started = time.monotonic()
        try:
            got = await self.connector.fetch(params, skip)
        except TransferError:
            raise
        except Exception as exc:  # a transport's own error (a refused connection, a timeout)
            raise TransferError(f"{type(exc).__name__}: {exc}") from exc
        if got.names != names[skip:]:
            raise TransferError("the blocks handed over are not this prompt's")
        block_ids = self._allocate(got)
        await self._copy_in_off_loop(got, block_ids)
        full = len(block_ids) - bool(tail)
        self.blocks.name(got.names[:full], block_ids[:full])  # findable only once written
        stats = self.leases.stats
        stats.blocks_received += len(block_ids)
        stats.bytes_received += got.nbytes
        stats.transfer_s += time.monotonic() - started
        return block_ids

    def _allocate(self, got: KVBlocks) -> list[int]:
        """Fresh blocks for what arrived, if it fits this pool."""
        layers, _, *slot_shape = self.kv.k.shape
        shape = (layers, len(got.names) * self.blocks.block_size, *slot_shape)
        if got.k.shape != shape or got.v.shape != shape:
            raise TransferError(f"blocks of shape {tuple(got.k.shape)} do not fit this pool")
        if len(got.names) > self.blocks.num_free:
            raise TransferError(f"{len(got.names)} blocks to take in, {self.blocks.num_free} free")
        return self.blocks.allocate(len(got.names))

    async def _copy_in_off_loop(self, got: KVBlocks, block_ids: list[int]) -> None:
        """Write the blocks on a thread of their own (tens of MB for a long prompt), so the loop
        keeps streaming other requests' tokens and the engine keeps stepping meanwhile.

        No forward pass reads these blocks while they are written: they were free, so no
        sequence's block table holds them, and they get their names (what a prefix lookup finds)
        only after the copy (a padded decode row reads slot 0 under a mask, whatever it holds).
        A forward pass running meanwhile writes only its own sequences' blocks, other memory.
        If the request is cancelled mid-copy, the blocks are freed only once the copy is done,
        so a freed block is never written to under its next owner."""
        copy = asyncio.ensure_future(torch_thread.apart(self._copy_in, got, block_ids))
        try:
            await asyncio.shield(copy)
        except asyncio.CancelledError:
            copy.add_done_callback(lambda _: self.blocks.free(block_ids))
            raise
        except BaseException:
            self.blocks.free(block_ids)
            raise

    def _copy_in(self, got: KVBlocks, block_ids: list[int]) -> None:
        size = self.blocks.block_size
        for pool, part in ((self.kv.k, got.k), (self.kv.v, got.v)):
            pool, part = by_block(pool, size), by_block(part, size)
            for i, block_id in enumerate(block_ids):  # a block is one row per layer
                pool[:, block_id].copy_(part[:, i])

    async def _release(self, params: TransferParams, how: str) -> None:
        """Tell the prefill engine we are done; if it cannot hear it, its lease expires."""
        try:
            await self.connector.release(params, how)
        except Exception as exc:
            log.warning("KV lease %s not released (%s): it expires", how, exc)

    # ------------------------------------------------------------ handing over

    def _retire(self, seq: Sequence) -> None:
        request = seq.request
        transfer = self._hand_over.pop(request, None)
        handed = transfer is not None and bool(request.finish_reason) and not request.cancelled
        if transfer is not None and handed:
            self.leases.hold(request.request_id, request.prompt_ids, seq.block_table)
            transfer.answer = self.params_for(request)
        super()._retire(seq)
        if handed:  # the timeline ends its span with the hand-over, not a finish reason
            self._retired[-1] = (request.trace_id, "handed over")

    def params_for(self, request: Request) -> TransferParams:
        """What the decode engine needs to fetch this request's blocks (vLLM's field names)."""
        return {
            "do_remote_decode": False,
            "do_remote_prefill": True,
            "remote_engine_id": self.engine_id,
            "remote_request_id": request.request_id,
            "remote_block_ids": self.leases.held[request.request_id].block_ids,
        }


def local_engines(lm: LoadedModel, **config: Any) -> tuple[DisaggEngine, DisaggEngine]:
    """A prefill and a decode engine in one process, sharing `lm`, built from the same
    DisaggConfig fields; the decode one fetches from the prefill one through a LocalConnector
    (the hand-over without HTTP, as the tests and bench/pictures run it)."""
    prefill = DisaggEngine(lm, DisaggConfig(engine_id="prefill", **config))
    decode = DisaggEngine(lm, DisaggConfig(engine_id="decode", **config), LocalConnector(prefill))
    return prefill, decode


class TransferCollector:
    """gateway_kv_transfer_* counters and the leases held, read at scrape time."""

    def __init__(self, engine: DisaggEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        leases = self.engine.leases
        stats = leases.stats
        blocks = CounterMetricFamily(
            "gateway_kv_transfer_blocks", "KV blocks handed over.", labels=["direction"]
        )
        blocks.add_metric(["sent"], stats.blocks_sent)
        blocks.add_metric(["received"], stats.blocks_received)
        nbytes = CounterMetricFamily(
            "gateway_kv_transfer_bytes", "Bytes of KV blocks handed over.", labels=["direction"]
        )
        nbytes.add_metric(["sent"], stats.bytes_sent)
        nbytes.add_metric(["received"], stats.bytes_received)
        ended = CounterMetricFamily(
            "gateway_kv_leases_ended", "Leases of handed-over blocks ended, by how.", labels=["how"]
        )
        for how, count in sorted(stats.ended.items()):
            ended.add_metric([how], count)
        messages = CounterMetricFamily(
            "gateway_kv_transfer_messages",
            "Fetches of KV blocks answered, by the way the blocks went.",
            labels=["via"],
        )
        for via in TRANSPORTS:
            messages.add_metric([via], stats.messages[via])
        yield blocks
        yield nbytes
        yield ended
        yield messages
        yield CounterMetricFamily(
            "gateway_kv_transfer_seconds", "Time spent fetching KV blocks.", value=stats.transfer_s
        )
        yield GaugeMetricFamily(
            "gateway_kv_leases_held", "Leases of handed-over blocks held.", value=len(leases.held)
        )
