"""Run step 10's two engines in-process and take a prompt's hand-over from their state.

A prefill engine and a decode engine (step 10's `DisaggEngine`, joined by a `LocalConnector` in
one process by step 10's `local_engines`, as tests/test_step10_disaggregated.py runs them)
serve two of the bench's chats the router's way: the prompt on the prefill engine with
max_tokens 1 and `do_remote_decode`, then the answer on the decode engine with the
`kv_transfer_params` the prefill engine answered. The second chat shares the first one's
system prompt, so the decode engine already holds the blocks of that part of it and takes in
only the rest.

The moment drawn lies inside the decode engine's `take_in`: the blocks it lacked are fetched,
written into its pool (the full ones named), and the prefill engine still holds its blocks under
the lease. No attribute marks that moment, so `watch_transfer` wraps the decode engine's
connector from outside (as capture.py's `watch_drafts` wraps the runner) and reads the prefill
engine when `release` is called, before passing the call on; then it reads the decode engine
when `take_in` gives its scheduler the blocks (full and partial) to pin, wrapped the same way.
The shipped engine carries no hook for pictures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.pictures.capture import PoolView, chat_request, pool_of, prompts
from common.model import LoadedModel
from common.request import Request
from step10_disaggregated.engine import KV_TRANSFER, DisaggEngine, KVTransfer
from step10_disaggregated.kv_connector import KVBlocks, KVConnector, TransferParams

FIRST, SECOND = "shared-hours", "shared-rooms"  # the same system prompt, then 3 blocks apart


@dataclass(frozen=True)
class Handover:
    """Both pools at the moment the decode engine has taken a prompt's blocks in and is about
    to release the prefill engine's lease; the block lists are in the prompt's token order."""

    request: str
    prompt_tokens: int
    bytes_per_token: int  # K and V of one token slot, every layer
    prefill: PoolView  # tables: the lease's blocks
    decode: PoolView  # tables: the prompt's blocks as the decode engine's prefix cache names them
    leased: list[int]  # prefill engine: the blocks under the lease, the last maybe partial
    partial: int  # tokens in the last leased block when it is partly filled, else 0
    kept: list[int]  # decode engine: blocks its prefix cache held already, not moved
    taken_in: list[int]  # decode engine: fresh blocks the moved keys and values went into
    moved_bytes: int  # the keys and values that crossed, every layer
    lease_left_s: float  # of lease_s, when the blocks were in
    lease_s: float
    release: str  # how the decode engine ends the lease: confirmed | cancelled

    @property
    def block_size(self) -> int:
        return self.decode.block_size

    @property
    def sent(self) -> list[int]:
        """The prefill engine's blocks whose contents moved: the lease's after the kept ones."""
        return self.leased[len(self.kept) :]

    @property
    def handed_tokens(self) -> int:
        """Prompt tokens whose keys and values the lease holds: all but the last."""
        return (len(self.leased) - bool(self.partial)) * self.block_size + self.partial

    @property
    def moved_tokens(self) -> int:
        """Prompt tokens whose keys and values crossed: the handed-over ones after the kept."""
        return self.handed_tokens - len(self.kept) * self.block_size

    @property
    def computed_on_decode(self) -> int:
        """Prompt tokens the decode engine computes itself: those past the handed-over ones."""
        return self.prompt_tokens - self.handed_tokens


class watch_transfer:
    """The decode engine's connector, wrapped: every call passes through; `release` first reads
    the prefill engine (the lease not yet ended), and the decode scheduler's
    `pin_until_running`, wrapped too, then reads the decode engine (the blocks written, the
    full ones named, none run yet)."""

    def __init__(self, prefill: DisaggEngine, decode: DisaggEngine) -> None:
        self.prefill, self.decode = prefill, decode
        self.inner: KVConnector = decode.connector
        self.fetched: KVBlocks | None = None
        self.released: tuple | None = None  # the prefill side, read at `release`
        self.seen: list[Handover] = []
        self.requests: dict[str, Request] = {}  # the decode side's, by id: their prompt lengths
        decode.connector = self
        self.pin = decode.scheduler.pin_until_running
        decode.scheduler.pin_until_running = self.pinned  # type: ignore[method-assign]

    async def fetch(self, params: TransferParams, skip: int) -> KVBlocks:
        self.fetched = await self.inner.fetch(params, skip)
        return self.fetched

    async def release(self, params: TransferParams, how: str) -> None:
        if self.fetched is not None:
            self.released = self.read_prefill(params["remote_request_id"], self.fetched, how)
        self.fetched = None
        await self.inner.release(params, how)

    def read_prefill(self, request_id: str, got: KVBlocks, how: str) -> tuple:
        lease = self.prefill.leases.held[request_id]
        tokens = self.requests[request_id].num_prompt_tokens
        view = pool_of(self.prefill.blocks, {"lease": list(lease.block_ids)}, {"lease": tokens})
        left = lease.expires_at - time.monotonic()
        return request_id, got, how, view, list(lease.block_ids), left

    def pinned(
        self, request: Request, block_ids: list[int], tail: tuple[int, int] | None = None
    ) -> None:
        if self.released is not None:
            self.seen.append(self.read(block_ids, tail))
        self.released = None
        self.pin(request, block_ids, tail)

    def read(self, block_ids: list[int], tail: tuple[int, int] | None) -> Handover:
        request_id, got, how, prefill_view, leased, left = self.released  # type: ignore[misc]
        size = self.decode.blocks.block_size
        held, partial = [*block_ids, tail[0]] if tail else list(block_ids), tail[1] if tail else 0
        skip = len(leased) - len(got.names)
        handed = (len(held) - bool(partial)) * size + partial
        return Handover(
            request_id,
            self.requests[request_id].num_prompt_tokens,
            self.decode.kv.bytes_per_block // size,
            prefill_view,
            pool_of(self.decode.blocks, {request_id: held}, {request_id: handed}),
            leased,
            partial,
            held[:skip],
            held[skip:],
            got.nbytes,
            left,
            self.prefill.leases.lease_s,
            how,
        )


async def run_phase(engine: DisaggEngine, request: Request, params: TransferParams) -> KVTransfer:
    """Submit with these kv_transfer_params (what the engine's server does for the API
    request) and step the engine until it is idle."""
    transfer = KVTransfer(params)
    token = KV_TRANSFER.set(transfer)
    try:
        await engine.submit(request)
    finally:
        KV_TRANSFER.reset(token)
    while engine.scheduler.has_work:
        await engine.step()
    return transfer


async def handover_scene(
    prefill: DisaggEngine, decode: DisaggEngine, lm: LoadedModel, max_tokens: int = 4
) -> Handover:
    """Two chats, each prefilled on `prefill` and decoded on `decode`; the second's hand-over."""
    watch = watch_transfer(prefill, decode)
    for prompt in prompts(FIRST, SECOND):
        first = chat_request(lm, prompt, 1)
        answer = (await run_phase(prefill, first, {"do_remote_decode": True})).answer
        assert answer is not None, "the prefill engine handed nothing over"
        second = watch.requests[prompt.id] = chat_request(lm, prompt, max_tokens)
        await run_phase(decode, second, answer)
    assert len(watch.seen) == 2, "each chat's blocks are taken in once"
    return watch.seen[-1]
