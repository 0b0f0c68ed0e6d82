"""Step 10's engines on the tiny model, in-process: a prompt prefilled on one engine, its KV
blocks handed over, the answer decoded on another; the blocks moved are the ones lacking, named
in the decode engine's prefix cache; leases freed on every path; faults handled by policy."""

from __future__ import annotations

import asyncio
import mmap
import os
import threading

import pytest
import torch

from common.config import ServerConfig
from common.errors import APIError
from common.model import load_model
from common.prefix import block_hashes
from step7_real_kv.engine import EngineConfig, PagedEngine
from step10_disaggregated.engine import (
    KV_TRANSFER,
    DisaggConfig,
    DisaggEngine,
    KVTransfer,
    local_engines,
)
from step10_disaggregated.kv_connector import (
    KVBlocks,
    LocalConnector,
    TransferError,
    decode,
    encode,
)
from step10_disaggregated.leases import block_slots, handed_over
from tests.engine_helpers import drain, make_request, until

BLOCK = 4
PROMPT = list(range(300, 314))  # 14 tokens: 13 handed over (3 full blocks, 1 token of a 4th)
SMALL = {"block_size": BLOCK, "num_kv_blocks": 32, "num_speculative_tokens": 0}
LONG = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the warm sun"


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def engines(lm, connector=None, **config):
    """A prefill and a decode engine, the decode one fetching from the prefill one (or through
    `connector`)."""
    prefill, decode_engine = local_engines(lm, **{**SMALL, **config})
    if connector is not None:
        decode_engine.connector = connector
    return prefill, decode_engine


async def run(engine, request, params=None) -> KVTransfer:
    """Submit `request` with these kv_transfer_params and step `engine` until it is idle."""
    transfer = KVTransfer(params or {})
    token = KV_TRANSFER.set(transfer)
    try:
        await engine.submit(request)
    finally:
        KV_TRANSFER.reset(token)
    while engine.scheduler.has_work:
        await engine.step()
    return transfer


async def prefill_phase(lm, engine, prompt, **sampling):
    """The proxy's first phase: max_tokens 1 and do_remote_decode; the params it answers."""
    request = make_request(lm, prompt, 1, **sampling)
    transfer = await run(engine, request, {"do_remote_decode": True})
    await drain(request)
    assert transfer.answer is not None
    return transfer.answer


async def disaggregated(lm, prefill, decode_engine, prompt, max_tokens, **sampling):
    """Both phases: the answer decoded on `decode_engine` from `prefill`'s blocks."""
    params = await prefill_phase(lm, prefill, prompt, **sampling)
    request = make_request(lm, prompt, max_tokens, **sampling)
    await run(decode_engine, request, params)
    await drain(request)
    return request


def step7(lm, prompt, max_tokens, **sampling) -> list[int]:
    async def go():
        engine = PagedEngine(lm, EngineConfig(block_size=BLOCK, num_kv_blocks=32))
        request = make_request(lm, prompt, max_tokens, **sampling)
        engine.scheduler.add(request)
        while engine.scheduler.has_work:
            await engine.step()
        await drain(request)
        return request.output_ids

    return asyncio.run(go())


def assert_pool_empty(engine: DisaggEngine) -> None:
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert set(engine.blocks.ref_counts) == {0}
    assert not engine.leases.held
    assert not engine.scheduler.import_pins


# ---------------------------------------------------------------- the connector


def test_blocks_out_and_in_are_equal_over_the_wire(tiny_lm):
    async def go():
        prefill, decode_engine = engines(tiny_lm)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        lease = prefill.leases.held[params["remote_request_id"]]
        assert params["remote_block_ids"] == lease.block_ids and len(lease.block_ids) == 4
        sent = prefill.leases.read(params["remote_request_id"], 0)
        slots = block_slots(lease.block_ids, BLOCK)
        torch.testing.assert_close(sent.k, prefill.kv.k[:, slots], rtol=0, atol=0)
        torch.testing.assert_close(sent.v, prefill.kv.v[:, slots], rtol=0, atol=0)
        parts = encode(sent)
        assert parts[1].nbytes == sent.k.nbytes and parts[0].nbytes % 64 == 0  # keys aligned
        message = bytearray(b"".join(parts))
        wired = decode(message)
        assert wired.names == handed_over(PROMPT, BLOCK)[0]
        assert wired.names[:3] == block_hashes(PROMPT[:12], BLOCK)
        assert torch.equal(wired.k, sent.k) and torch.equal(wired.v, sent.v)
        values = parts[0].nbytes + parts[1].nbytes  # where the values start
        message[values : values + 4] = bytes(4)  # the tensors are views of the buffer, not copies
        assert wired.v.view(-1)[0] == 0 and sent.v.view(-1)[0] != 0
        request = make_request(tiny_lm, PROMPT, 3)
        token = KV_TRANSFER.set(KVTransfer(params))
        await decode_engine.submit(request)
        KV_TRANSFER.reset(token)
        assert decode_engine.scheduler.import_pins  # pinned while it waits ...
        ((_, (tail_block, tail)),) = decode_engine.scheduler.import_tails.items()
        assert tail == 1  # the 13th token, in the partial block
        await decode_engine.step()
        assert not decode_engine.scheduler.import_pins  # ... the scheduler's pins once it runs
        assert not decode_engine.scheduler.import_tails
        (seq,) = decode_engine.scheduler.running
        assert seq.block_table[3] == tail_block  # the partial block is the sequence's ...
        assert seq.num_computed == len(PROMPT)  # ... so one row ran: the prompt's last token
        slot = tail_block * BLOCK  # the 13th token's keys and values, as the prefill computed
        assert torch.equal(decode_engine.kv.k[:, slot], sent.k[:, 12])
        assert torch.equal(decode_engine.kv.v[:, slot], sent.v[:, 12])
        while decode_engine.scheduler.has_work:
            await decode_engine.step()
        taken = decode_engine.blocks.lookup(block_hashes(PROMPT[:12], BLOCK))
        assert len(taken) == 3  # named in the decode engine's prefix cache
        got = block_slots(taken, BLOCK)
        assert torch.equal(decode_engine.kv.k[:, got], sent.k[:, :12])
        assert torch.equal(decode_engine.kv.v[:, got], sent.v[:, :12])
        assert request.cached_prompt_tokens == 13  # admitted as a prefix-cache hit, and more
        assert_pool_empty(prefill)
        assert_pool_empty(decode_engine)

    asyncio.run(go())


def test_blocks_in_shared_memory_are_the_wire_message(tiny_lm, tmp_path):
    """gather_to_file writes the message encode sends, in place in a file (one copy out of the
    pool); mapped and decoded it gives the same blocks; a file its reader never took goes when
    the lease ends."""

    async def go():
        prefill, _ = engines(tiny_lm, kv_lease_s=5.0)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        rid = params["remote_request_id"]
        sent = prefill.leases.read(rid, 0)
        with prefill.leases.lend(rid, 1) as lent:  # the blocks after the first
            path = prefill.leases.gather_to_file(*lent, str(tmp_path))
        with open(path, "rb") as file:
            message = file.read()
        skipped = KVBlocks(sent.names[1:], sent.k[:, BLOCK:], sent.v[:, BLOCK:])
        assert message == b"".join(encode(skipped))
        with open(path, "r+b") as file:
            mapped = decode(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY))
        assert mapped.names == sent.names[1:] and torch.equal(mapped.k, skipped.k)
        prefill.leases.attach_file(rid, path)
        lease = prefill.leases.held[rid]
        assert prefill.leases.expire(now=lease.expires_at) == 1
        assert not os.path.exists(path)  # never taken: gone with the lease
        orphan = prefill.leases.gather_to_file(sent.names, lease.block_ids, str(tmp_path))
        prefill.leases.attach_file("no such lease", orphan)
        assert not os.path.exists(orphan)  # its lease ended already: removed at once
        assert_pool_empty(prefill)

    asyncio.run(go())


def test_no_room_in_shared_memory_is_a_transfer_error_and_leaves_no_file(
    tiny_lm, tmp_path, monkeypatch
):
    from step10_disaggregated import leases as leases_module

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    async def go():
        prefill, _ = engines(tiny_lm)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        monkeypatch.setattr(leases_module.os, "posix_fallocate", full)
        lent = prefill.leases.lend(params["remote_request_id"], 0)
        with lent as (names, block_ids), pytest.raises(TransferError, match="no room"):
            prefill.leases.gather_to_file(names, block_ids, str(tmp_path))
        assert os.listdir(tmp_path) == []
        assert prefill.leases.held  # the lease stands: the blocks can still go another way
        prefill.leases.release_all("stopped")

    asyncio.run(go())


def test_the_shared_memory_way_falls_back_to_the_socket(monkeypatch):
    """A fetch through /dev/shm that fails (no room there, no such file here) asks again over
    the socket, once."""
    from step10_disaggregated import http_connector

    blocks = KVBlocks([b"n" * 32], torch.zeros(2, 4, 1, 8), torch.ones(2, 4, 1, 8))
    asked = []

    def no_file(url, body, timeout_s):
        asked.append(body["via"])
        raise TransferError("no such file")

    def whole(url, body, timeout_s):
        asked.append(body["via"])
        return bytearray(b"".join(encode(blocks)))

    monkeypatch.setattr(http_connector, "_fetch_mapped", no_file)
    monkeypatch.setattr(http_connector, "_fetch_whole", whole)
    connector = http_connector.HttpConnector(via="shm")
    params = {"remote_host": "127.0.0.1", "remote_port": 1, "remote_request_id": "r"}
    got = asyncio.run(connector.fetch(params, 0))
    assert asked == ["shm", "http"]
    assert got.names == blocks.names and torch.equal(got.v, blocks.v)


def test_a_bad_message_is_a_transfer_error():
    blocks = KVBlocks([b"x" * 32], torch.zeros(2, 4, 1, 8), torch.ones(2, 4, 1, 8))
    with pytest.raises(TransferError):
        decode(b"".join(encode(blocks))[:-3])


def test_only_the_blocks_the_decode_engine_lacks_move(tiny_lm):
    async def go():
        prefill, decode_engine = engines(tiny_lm)
        await run(decode_engine, make_request(tiny_lm, PROMPT[:9], 1))  # 2 blocks cached there
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        request = make_request(tiny_lm, PROMPT, 2)
        await run(decode_engine, request, params)
        assert prefill.leases.stats.blocks_sent == 2  # the third full block and the partial
        assert decode_engine.leases.stats.blocks_received == 2
        assert decode_engine.leases.stats.bytes_received == 2 * decode_engine.kv.bytes_per_block
        assert request.cached_prompt_tokens == 13
        assert_pool_empty(prefill)
        assert_pool_empty(decode_engine)

    asyncio.run(go())


# ---------------------------------------------------------------- exact


@pytest.mark.parametrize("prompt", [PROMPT, LONG, PROMPT[:5], PROMPT[:4], "Hi"])
def test_greedy_answers_are_step_7s(tiny_lm, prompt):
    async def go():
        prefill, decode_engine = engines(tiny_lm)
        request = await disaggregated(tiny_lm, prefill, decode_engine, prompt, 12)
        assert_pool_empty(prefill)
        assert_pool_empty(decode_engine)
        return request.output_ids

    assert asyncio.run(go()) == step7(tiny_lm, prompt, 12)


def test_seeded_sampled_answers_are_step_7s(tiny_lm):
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 1234}

    async def go():
        prefill, decode_engine = engines(tiny_lm, num_speculative_tokens=3)
        request = await disaggregated(tiny_lm, prefill, decode_engine, LONG, 16, **sampling)
        return request.output_ids

    assert asyncio.run(go()) == step7(tiny_lm, LONG, 16, **sampling)


# ---------------------------------------------------------------- leases


def test_a_lease_nobody_confirms_expires_and_frees_its_blocks(tiny_lm):
    async def go():
        prefill, _ = engines(tiny_lm, kv_lease_s=5.0)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        lease = prefill.leases.held[params["remote_request_id"]]
        assert prefill.blocks.num_free == prefill.blocks.num_blocks - 4  # held for the decode
        assert prefill.leases.expire(now=lease.expires_at - 0.01) == 0
        assert prefill.leases.expire(now=lease.expires_at) == 1
        assert prefill.leases.stats.ended["expired"] == 1
        assert_pool_empty(prefill)
        with pytest.raises(TransferError):
            prefill.leases.read(params["remote_request_id"], 0)

    asyncio.run(go())


def test_stopping_the_prefill_engine_frees_its_leases(tiny_lm):
    async def go():
        prefill, _ = engines(tiny_lm)
        await prefill_phase(tiny_lm, prefill, PROMPT)
        await prefill.stop()
        assert prefill.leases.stats.ended["stopped"] == 1
        assert_pool_empty(prefill)

    asyncio.run(go())


def test_a_prefill_that_did_not_end_well_holds_nothing(tiny_lm):
    async def go():
        prefill, _ = engines(tiny_lm)
        request = make_request(tiny_lm, PROMPT, 1)
        request.cancel()  # its client left before it ran
        transfer = await run(prefill, request, {"do_remote_decode": True})
        assert transfer.answer is None
        assert_pool_empty(prefill)

    asyncio.run(go())


# ---------------------------------------------------------------- faults


class GoneConnector:
    """The prefill engine is gone: every fetch fails as a refused connection would."""

    released: list[str] = []

    async def fetch(self, params, skip):
        raise ConnectionRefusedError("prefill engine gone")

    async def release(self, params, how):
        raise ConnectionRefusedError("prefill engine gone")


def test_blocks_that_cannot_be_had_are_recomputed_by_default(tiny_lm):
    async def go():
        prefill, decode_engine = engines(tiny_lm, connector=GoneConnector())
        request = await disaggregated(tiny_lm, prefill, decode_engine, LONG, 10)
        assert request.cached_prompt_tokens == 0  # prefilled here
        assert decode_engine.leases.stats.blocks_received == 0
        assert_pool_empty(decode_engine)
        await prefill.stop()  # its lease was never released: it goes with the engine
        assert_pool_empty(prefill)
        return request.output_ids

    assert asyncio.run(go()) == step7(tiny_lm, LONG, 10)


def test_blocks_that_cannot_be_had_fail_the_request_under_policy_fail(tiny_lm):
    async def go():
        prefill, decode_engine = engines(
            tiny_lm, connector=GoneConnector(), kv_transfer_failure="fail"
        )
        params = await prefill_phase(tiny_lm, prefill, LONG)
        request = make_request(tiny_lm, LONG, 10)
        await run(decode_engine, request, params)
        with pytest.raises(APIError, match="KV blocks could not be had") as caught:
            await drain(request)
        assert caught.value.status == 502
        assert_pool_empty(decode_engine)

    asyncio.run(go())


def test_blocks_of_another_prompt_are_refused_and_recomputed(tiny_lm):
    async def go():
        prefill, decode_engine = engines(tiny_lm)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        other = [t + 1 for t in PROMPT]
        request = make_request(tiny_lm, other, 4)
        await run(decode_engine, request, params)
        await drain(request)
        assert decode_engine.leases.stats.blocks_received == 0
        assert prefill.leases.stats.ended["cancelled"] == 1
        assert_pool_empty(prefill)
        assert_pool_empty(decode_engine)
        return request.output_ids

    assert asyncio.run(go()) == step7(tiny_lm, [t + 1 for t in PROMPT], 4)


class HeldCopyEngine(DisaggEngine):
    """Writes the blocks it takes in only when let go (a long copy), on its worker thread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.copying, self.go_on = threading.Event(), threading.Event()

    def _copy_in(self, got, block_ids):
        self.copying.set()
        assert self.go_on.wait(timeout=10), "the copy was never let go"
        super()._copy_in(got, block_ids)


def held_copy_engines(lm):
    prefill, _ = engines(lm)
    config = DisaggConfig(engine_id="decode", **SMALL)
    return prefill, HeldCopyEngine(lm, config, LocalConnector(prefill))


def test_the_loop_keeps_running_while_the_blocks_are_written(tiny_lm):
    async def go():
        prefill, decode_engine = held_copy_engines(tiny_lm)
        other = make_request(tiny_lm, LONG, 6)  # a stream decoding on the decode engine
        decode_engine.scheduler.add(other)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        request = make_request(tiny_lm, PROMPT, 3)
        submitted = asyncio.create_task(run(decode_engine, request, params))
        await until(decode_engine.copying.is_set)
        while not other.finished:  # the engine steps and streams while the copy is held
            await decode_engine.step()
        decode_engine.go_on.set()
        await submitted
        await drain(request)
        assert request.cached_prompt_tokens == 13
        assert_pool_empty(decode_engine)
        return other.output_ids

    assert asyncio.run(go()) == step7(tiny_lm, LONG, 6)  # its tokens came while the copy was held


def test_blocks_cancelled_mid_copy_are_freed_once_the_copy_is_done(tiny_lm):
    async def go():
        prefill, decode_engine = held_copy_engines(tiny_lm)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        submitted = asyncio.create_task(
            run(decode_engine, make_request(tiny_lm, PROMPT, 3), params)
        )
        await until(decode_engine.copying.is_set)
        submitted.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submitted
        # still being written: not free for anyone else yet
        assert decode_engine.blocks.num_free == decode_engine.blocks.num_blocks - 4
        decode_engine.go_on.set()
        await until(lambda: decode_engine.blocks.num_free == decode_engine.blocks.num_blocks)
        assert prefill.leases.stats.ended["cancelled"] == 1
        assert not decode_engine.blocks.lookup(block_hashes(PROMPT[:12], BLOCK))  # unnamed
        assert_pool_empty(prefill)
        assert_pool_empty(decode_engine)

    asyncio.run(go())


class HeldConnector(LocalConnector):
    """Holds one call, the fetch or the release, until let go: a transfer in flight, or a caller
    that can leave after the blocks came, for as long as a test needs."""

    def __init__(self, *engines, hold: str = "fetch") -> None:
        super().__init__(*engines)
        # a mistyped call would hold nothing, and the test would wait for it forever
        assert hold in ("fetch", "release"), f"no call {hold!r} to hold"
        self.hold = hold
        self.started, self.go_on = asyncio.Event(), asyncio.Event()

    async def _held(self, call: str) -> None:
        if call == self.hold:
            self.started.set()
            await self.go_on.wait()

    async def fetch(self, params, skip):
        await self._held("fetch")
        return await super().fetch(params, skip)

    async def release(self, params, how):
        await self._held("release")
        await super().release(params, how)


def test_a_request_cancelled_mid_transfer_frees_both_sides(tiny_lm):
    async def go():
        prefill, decode_engine = engines(tiny_lm)
        connector = decode_engine.connector = HeldConnector(prefill)
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        request = make_request(tiny_lm, PROMPT, 8)
        submitted = asyncio.create_task(run(decode_engine, request, params))
        await connector.started.wait()
        request.cancel()
        connector.go_on.set()
        await submitted
        await until(lambda: request.finished)
        assert prefill.leases.stats.ended["cancelled"] == 1
        assert request.output_ids == []
        assert_pool_empty(prefill)
        assert_pool_empty(decode_engine)

    asyncio.run(go())


def test_a_caller_gone_while_the_lease_is_released_leaves_no_block_held(tiny_lm):
    async def go():
        prefill, decode_engine = engines(tiny_lm)
        connector = decode_engine.connector = HeldConnector(prefill, hold="release")
        params = await prefill_phase(tiny_lm, prefill, PROMPT)
        request = make_request(tiny_lm, PROMPT, 8)
        submitted = asyncio.create_task(run(decode_engine, request, params))
        await connector.started.wait()  # the 4 blocks are in, the partial one too
        assert decode_engine.blocks.num_free == decode_engine.blocks.num_blocks - 4
        submitted.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submitted
        assert not decode_engine.scheduler.import_tails
        assert_pool_empty(decode_engine)
        prefill.leases.expire(now=float("inf"))  # never told: its lease ends by expiring
        assert_pool_empty(prefill)

    asyncio.run(go())


def test_the_timelines_show_the_hand_over_and_the_blocks_taken_in(tiny_lm):
    async def go():
        prefill, decode_engine = engines(tiny_lm, timeline=True)
        request = await disaggregated(tiny_lm, prefill, decode_engine, PROMPT, 3)
        _, spans = prefill.timeline.snapshot()
        assert [span.how for span in spans.values()] == ["handed over"]
        iterations, spans = decode_engine.timeline.snapshot()
        first = iterations[0].steps[0]
        assert (first.request_id, first.kind, first.cached) == (request.trace_id, "prefill", 13)
        assert spans[request.trace_id].how == "length"

    asyncio.run(go())
